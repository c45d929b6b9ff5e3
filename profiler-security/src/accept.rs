//! Accepting TLS connections: handshakes run concurrently (a slow or
//! hostile client cannot hold up the others), each bounded in time, and
//! every rejected peer is logged with the reason.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::ServerConfig;
use tokio::{
    net::TcpStream,
    sync::{mpsc, Semaphore},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use crate::{door::Admitted, TlsFailure};

/// Longest a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, at most.
const MAX_HANDSHAKES: usize = 256;
/// Established connections waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// An established TLS connection and its peer.
pub type Accepted = (TlsStream<TcpStream>, SocketAddr);

/// Handshakes the connections of `incoming` (those the door let in, see
/// [`crate::door`]) until the receiver is dropped. `what` names the
/// server in logs ("gRPC", "HTTP"); `on_reject` is told every failure (to
/// count it).
pub fn spawn_acceptor(
    mut incoming: Admitted,
    config: Arc<ServerConfig>,
    what: &'static str,
    on_reject: impl Fn(&TlsFailure) + Send + Sync + 'static,
) -> mpsc::Receiver<Accepted> {
    let (ready, accepted) = mpsc::channel(READY_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    let on_reject = Arc::new(on_reject);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = ready.closed() => return,
                conn = incoming.recv() => match conn {
                    Some(conn) => conn,
                    None => return,
                },
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (acceptor, ready, on_reject) = (acceptor.clone(), ready.clone(), on_reject.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let failure = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let _ = ready.send((stream, peer)).await;
                        return;
                    }
                    Ok(Err(e)) => TlsFailure::find(&e).unwrap_or(TlsFailure::Other(e.to_string())),
                    Err(_) => TlsFailure::Timeout,
                };
                on_reject(&failure);
                tracing::warn!(
                    %peer,
                    reason = failure.reason(),
                    "{what}: connection rejected: {}",
                    failure.describe(&format!("the client at {peer}"))
                );
            });
        }
    });
    accepted
}

pub use tokio_rustls::server::TlsStream as ServerTlsStream;
