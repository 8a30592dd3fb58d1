//! `envoy.filters.network.direct_response`: write fixed bytes, then close.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::drain::DrainWatch;

/// How long to keep reading (and discarding) after the response, so that unread client bytes do not turn the
/// close into a reset that could destroy the response in flight.
const LINGER: Duration = Duration::from_secs(1);

pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, body: &[u8], mut drain: DrainWatch) {
    let write = async {
        stream.write_all(body).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(LINGER, async { while stream.read(&mut sink).await.unwrap_or(0) > 0 {} }).await;
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        _ = write => {}
        _ = drain.closed() => {}
    }
}
