//! SOCKS5 (RFC 1928), CONNECT only, no authentication: the parsers and encoders are the pure
//! ones of [`egress_common::wire::socks5`]; here is the I/O: reading until a message is
//! complete, and the node proxy's client handshake.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub use egress_common::wire::socks5::*;

use super::{GatewayError, Target};

/// Reads from `s` into `buf` until `parse` has a result.
pub(crate) async fn read_until<T, E>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, GatewayError>
where
    GatewayError: From<E>,
{
    loop {
        if let Some(t) = parse(buf)? {
            return Ok(t);
        }
        if buf.len() >= max {
            return Err(GatewayError::TooLong(max));
        }
        let mut chunk = [0u8; 512];
        let room = (max - buf.len()).min(chunk.len());
        let n = s.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(GatewayError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The client side over a connected `s`: greeting, CONNECT `target`, the reply. After Ok the
/// stream carries the tunnelled bytes.
pub async fn connect(s: &mut TcpStream, target: &Target) -> Result<(), GatewayError> {
    // The request waits for the method choice: some servers (microsocks) read the greeting
    // alone and drop whatever came with it.
    s.write_all(&[VERSION, 1, NO_AUTH]).await?;
    let mut buf = Vec::new();
    let chosen = read_until(s, &mut buf, 2, |b: &[u8]| {
        Ok::<_, Socks5Error>((b.len() >= 2).then(|| (b[0], b[1])))
    })
    .await?;
    match chosen {
        (VERSION, NO_AUTH) => {}
        (VERSION, m) => return Err(Socks5Error::Method(m).into()),
        (v, _) => return Err(Socks5Error::Version(v).into()),
    }
    buf.drain(..2);
    s.write_all(&encode_request(target)).await?;
    let n = read_until(s, &mut buf, 3 + 1 + 256 + 2, parse_reply).await?;
    if buf.len() > n {
        // A server that sends tunnelled bytes before we wrote any is not one we can trust.
        return Err(GatewayError::Protocol(
            "bytes after the SOCKS5 reply".into(),
        ));
    }
    Ok(())
}
