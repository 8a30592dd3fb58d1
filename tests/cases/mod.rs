mod ads;
mod http;
mod istio_fixture;
mod listener_filters;
mod listener_updates;
mod process;
mod sidecar;
mod tcp_proxy;
