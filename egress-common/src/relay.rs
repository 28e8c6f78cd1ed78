//! The in-kernel relay of the transparent proxy (`run --relay kernel`): a relayed
//! connection's two sockets go into two SOCKHASH maps and an `sk_skb` stream-verdict program
//! redirects every byte one socket receives to the other socket's egress, so the payload
//! never reaches userspace.
//!
//! Keying: [`names::RELAY_PEERS`] holds each socket under the socket cookie of its *peer*
//! (the verdict program looks up the cookie of the socket a byte arrived on and finds where
//! it goes). Being in that map gives a socket the kernel's per-socket state (psock) that makes
//! it a redirect target, without changing how it receives. [`names::RELAY`] has the verdict
//! program attached: a socket put there has its received bytes judged by it. Both maps are
//! the agent's own (never pinned: the sockets die with the agent).
//!
//! What userspace still does is bookkeeping on counters ([`Counts`], from TCP_INFO and
//! SIOCINQ/SIOCOUTQ): when one side sends FIN, the other side may be shut down for writing
//! only once every byte redirected to it is in its send queue ([`Way::drained`]); the bytes
//! each way for the metrics are [`Way::moved`].

/// Map names (also in the agent). Not pinned, not part of `crate::names::ALL`.
pub mod names {
    /// SOCKHASH: socket cookie -> the peer socket (the redirect targets).
    pub const RELAY_PEERS: &str = "EGRESS_RELAY_PEERS";
    /// SOCKHASH with the stream verdict attached: socket cookie -> the socket itself.
    pub const RELAY: &str = "EGRESS_RELAY";
}

/// The stream verdict program's name.
pub const VERDICT_PROGRAM: &str = "egress_relay_verdict";

/// Sockets each relay map holds: two per relayed connection.
pub const RELAY_SOCKETS: u32 = 65_536;

/// `sk_action`: apply the redirect if the helper set one, otherwise keep the bytes on the
/// socket they arrived on (userspace may read them; nothing is dropped).
pub const SK_PASS: u32 = 1;
/// `sk_action`: free the skb.
pub const SK_DROP: u32 = 0;

/// What the verdict program does with an skb of `len` payload bytes: redirect it to the
/// peer, or drop it when it is empty. An empty skb is a bare FIN (TCP has already taken
/// note of it; the agent passes the FIN on): redirected to the peer's egress, the kernel's
/// send worker would take the zero-length send for a broken pipe (EPIPE on the peer, and
/// no more bytes that way; seen on 6.18).
pub fn redirects(len: u32) -> bool {
    len > 0
}

/// One socket's counters: `tcpi_bytes_received` and `tcpi_bytes_acked` from TCP_INFO, the
/// bytes in its receive queue (SIOCINQ) and send queue (SIOCOUTQ), and whether the peer's
/// FIN has arrived (POLLRDHUP; the TCP state cannot tell: a socket whose both FINs passed
/// reads as CLOSE, like a reset one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub received: u64,
    pub acked: u64,
    pub inq: u64,
    pub outq: u64,
    pub fin: bool,
}

impl Counts {
    /// Payload bytes received: `tcpi_bytes_received` counts the FIN as one byte.
    pub fn data_received(&self) -> u64 {
        self.received.saturating_sub(self.fin as u64)
    }

    /// Payload bytes taken out of the receive queue (by a reader or the verdict program).
    pub fn consumed(&self) -> u64 {
        self.data_received().saturating_sub(self.inq)
    }

    /// Bytes ever put into the send queue (acked, or still queued). Counts the SYN of an
    /// active opener and our own FIN once acked: only differences taken before our FIN are
    /// meaningful.
    pub fn written(&self) -> u64 {
        self.acked + self.outq
    }
}

/// One way of a relayed connection, `from` -> `to`, as it stood when the kernel took over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Way {
    /// Bytes of `from` consumed by userspace before the switch (nothing consumes them after
    /// but the verdict program).
    pub consumed_before: u64,
    /// Bytes userspace had written into `to` before the switch.
    pub written_before: u64,
}

impl Way {
    /// From both sockets' counters at the switch (taken while userspace reads and writes
    /// neither socket).
    pub fn at_switch(from: &Counts, to: &Counts) -> Self {
        Self {
            consumed_before: from.consumed(),
            written_before: to.written(),
        }
    }

    /// Bytes the kernel relayed this way so far (into `to`'s send queue).
    pub fn moved(&self, to: &Counts) -> u64 {
        to.written().saturating_sub(self.written_before)
    }

    /// Bytes `from` received that the kernel still has to relay.
    pub fn owed(&self, from: &Counts) -> u64 {
        from.data_received().saturating_sub(self.consumed_before)
    }

    /// Every byte `from` received is in `to`'s send queue (or sent): after `from`'s FIN,
    /// `to` may now be shut down for writing without losing any.
    pub fn drained(&self, from: &Counts, to: &Counts) -> bool {
        self.moved(to) >= self.owed(from)
    }
}

/// Whether two reads of a socket's counters around a SIOCINQ read saw no byte arrive in
/// between (so `inq` is consistent with `received`).
pub fn stable(before: u64, after: u64) -> bool {
    before == after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(received: u64, acked: u64, inq: u64, outq: u64, fin: bool) -> Counts {
        Counts {
            received,
            acked,
            inq,
            outq,
            fin,
        }
    }

    #[test]
    fn the_fin_is_not_payload() {
        // 5 bytes then FIN: the kernel counts 6 received (measured on 6.18).
        assert_eq!(c(6, 0, 0, 0, true).data_received(), 5);
        assert_eq!(c(5, 0, 0, 0, false).data_received(), 5);
        // SIOCINQ does not count the FIN either.
        assert_eq!(c(6, 0, 2, 0, true).consumed(), 3);
    }

    #[test]
    fn drained_once_every_received_byte_is_in_the_peer_send_queue() {
        // Client: 10 bytes read by userspace (sniffed) before the switch, 3 waiting.
        let client = c(13, 0, 3, 0, false);
        // Upstream: SYN acked (1) and the 10 sniffed bytes written.
        let up = c(0, 11, 0, 0, false);
        let w = Way::at_switch(&client, &up);
        assert_eq!(
            w,
            Way {
                consumed_before: 10,
                written_before: 11
            }
        );
        // 100 more bytes and FIN arrive; the kernel has moved 50 so far.
        let client = c(114, 0, 0, 0, true);
        assert_eq!(w.owed(&client), 103);
        let up = c(0, 40, 0, 21, false);
        assert_eq!(w.moved(&up), 50);
        assert!(!w.drained(&client, &up));
        let up = c(0, 100, 0, 14, false);
        assert!(w.drained(&client, &up));
        assert_eq!(w.moved(&up), 103);
    }

    #[test]
    fn a_bare_fin_is_not_redirected() {
        assert!(!redirects(0));
        assert!(redirects(1));
        assert!(redirects(u32::MAX));
    }

    #[test]
    fn stable_reads() {
        assert!(stable(7, 7));
        assert!(!stable(7, 9));
    }
}
