/// Every scenario runs over both ADS flavours: state of the world (GRPC) and delta (DELTA_GRPC).
macro_rules! both_protocols {
    ($($scenario:ident),*) => {
        mod sotw {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario("GRPC").await
            })*
        }
        mod delta {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario("DELTA_GRPC").await
            })*
        }
    };
}

mod access_log;
mod admin;
mod ads;
mod http;
mod http_rds;
mod istio_fixture;
mod listener_filters;
mod listener_updates;
mod mesh;
mod process;
mod sds;
mod sidecar;
mod tcp_proxy;
mod tls;
