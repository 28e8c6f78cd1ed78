//! HTTP CONNECT: the parsers (request head, response, authority) and the request encoder are
//! the pure ones of [`egress_common::wire::connect`]; here is the node proxy's HTTP/1.1
//! client handshake.

use tokio::{io::AsyncWriteExt, net::TcpStream};

pub use egress_common::wire::connect::*;

use super::{socks5::read_until, GatewayError, Target};

/// The client side over a connected `s`. After Ok the stream carries the tunnelled bytes.
pub async fn connect(
    s: &mut TcpStream,
    target: &Target,
    host: Option<&str>,
) -> Result<(), GatewayError> {
    s.write_all(encode_request(target, host).as_bytes()).await?;
    let mut buf = Vec::new();
    let n = read_until(s, &mut buf, MAX_HEAD, parse_response).await?;
    if buf.len() > n {
        return Err(GatewayError::Protocol(
            "bytes after the CONNECT response".into(),
        ));
    }
    Ok(())
}
