//! xds-proxy: a proxy driven entirely by an xDS control plane, built on Envoy's listener architecture.
//!
//! # Threads and who owns what
//! - The **main thread** runs a current-thread tokio runtime that owns all mutable configuration: the bootstrap
//!   ([`config`]), the [`upstream::ClusterManager`] and the [`listener::manager::ListenerManager`]. Listener
//!   sockets are bound here, so a bind failure is an error for that listener, never a crash on a worker.
//! - **Workers** ([`listener::worker`]) are `--concurrency` OS threads, each with its own current-thread runtime
//!   (each pinned to a CPU of its own with the bootstrap's `enable_worker_cpu_affinity`).
//!   They read immutable snapshots only: the published `ListenerSet` and `ClusterSet` (`ArcSwap`), woken by a
//!   `watch` channel when a new listener set is published. Each accepted connection keeps the `Arc` of its filter
//!   chain for life.
//! - **Drains** ([`drain`]) are one primitive used for the process, each listener and each filter chain.
//! - The **admin server** ([`admin`]) runs on the main runtime too: Envoy's admin HTTP endpoints and gRPC (CSDS,
//!   reflection, health) on the bootstrap's `admin.address`, reading the managers and the per-resource xDS status
//!   ([`xds::status`]) the ADS client records.
//!
//! # One connection
//! accept (worker) → filter chain selection ([`listener::filter_chain`]) → terminal network filter
//! ([`network::tcp_proxy`], [`network::direct_response`]) → cluster host ([`upstream`]).

pub mod access_log;
pub mod admin;
pub mod alloc;
pub mod config;
pub mod drain;
pub mod listener;
pub mod network;
pub mod secret;
pub mod server;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod xds;

// In the library so every binary and test linking it (the proxy, xds-mock, the test suites) measures the same
// allocator that `/memory` reports on.
#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;
