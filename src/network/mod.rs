//! Network filters: what a filter chain does with a connection once it is chosen.

pub mod direct_response;
pub mod http;
pub mod splice;
pub mod tcp_proxy;
