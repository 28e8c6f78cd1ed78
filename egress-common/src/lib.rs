//! Types shared between the kernel programs (`egress-ebpf`) and the agent, and the pure
//! decision functions both sides use; with the `wire` feature, the agent's pure wire parsers
//! ([`wire`]).
//!
//! Every type here is `#[repr(C)]` with fixed-width fields and explicit padding, so its layout
//! is the same for `bpfel-unknown-none` and the host; `size_of` asserts pin it. Addresses are
//! kept as bytes in network order, ports as host-order integers.
#![no_std]

#[cfg(feature = "wire")]
extern crate alloc;

pub mod decide;
pub mod fqdn;
pub mod maps;
pub mod packet;
pub mod relay;
pub mod skb;
pub mod sockets;
pub mod tc;
#[cfg(feature = "wire")]
pub mod wire;

pub use decide::{decide, Decision, Outcome};
pub use maps::*;

/// Layout version of the maps and programs. Pins live under `<pin dir>/v<LAYOUT_VERSION>/`;
/// bump it whenever any type in this crate changes shape.
pub const LAYOUT_VERSION: u32 = 11;

/// IP protocol numbers as they appear in `bpf_sock_addr.protocol`.
pub mod proto {
    /// Matches every protocol (rules only).
    pub const ANY: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMP: u8 = 1;
    pub const ICMPV6: u8 = 58;
    /// SCTP: judged in the class of every other protocol (NetworkPolicy ports may name it).
    pub const SCTP: u8 = 132;

    /// The protocol's label in flows and metrics (`other` for any protocol but TCP and UDP).
    pub fn name(p: u8) -> &'static str {
        match p {
            TCP => "tcp",
            UDP => "udp",
            _ => "other",
        }
    }
}

/// What a rule does with the connections it matches.
pub mod action {
    /// Let the connection go to its destination directly.
    pub const ALLOW: u8 = 1;
    /// Redirect the connection to the agent's transparent proxy (host rules, `via: proxy`).
    pub const PROXY: u8 = 2;
    /// Refuse it: EPERM from connect()/sendmsg(), no packet sent.
    pub const DENY: u8 = 3;
    /// A deny of a policy in audit mode (`spec.mode: audit`) over a port where an enforced
    /// allow wins: let through directly and reported as audited (segment values only).
    pub const AUDIT_ALLOW: u8 = 4;
    /// A deny of a policy in audit mode where no enforced rule matches: `enableEgress`
    /// decides as if unmatched; when it lets the connection through, it is reported as audited.
    pub const AUDIT_DEFAULT: u8 = 5;
}
