//! The operator's side: the command line ([`cli`]), the local admin API ([`protocol`] on the
//! wire, [`server`] in the agent, [`client`] in the CLI), and the verbs that act on this node
//! without a running agent ([`local`]).

pub mod ask;
pub mod cli;
pub mod client;
pub mod local;
pub mod preview;
pub mod protocol;
pub mod server;
