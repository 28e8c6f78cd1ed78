//! Finding the host a client asks for in its first bytes (TLS ClientHello SNI, HTTP/1.x
//! `Host`): the pure parsers live in [`egress_common::wire::sniff`] (fuzzed without the agent,
//! see docs/fuzzing.md); the proxy uses them from here.

pub use egress_common::wire::sniff::*;
