mod listener_updates;
mod process;
mod tcp_proxy;
