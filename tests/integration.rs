//! Integration tests: real sockets, real worker threads, real processes. One binary (see STYLE.md #11).

mod cases;
mod common;
