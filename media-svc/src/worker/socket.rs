//! A peer's UDP socket: bound for it, read by one small task into the worker's inbound queue,
//! and written without waiting (a full send buffer loses the datagram, counted by the caller).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::MAX_DATAGRAM;
use crate::engine::EngineError;

/// A non-blocking socket registered with the worker's event loop for reading only.
pub(super) type PeerSocket = Arc<AsyncFd<std::net::UdpSocket>>;

/// Binds a peer's socket at `local`; the socket and the address it is bound to.
pub(super) fn bind(local: SocketAddr) -> Result<(PeerSocket, SocketAddr), EngineError> {
    let std_socket = std::net::UdpSocket::bind(local)
        .map_err(|e| EngineError::Setup(format!("bind {local}: {e}")))?;
    std_socket
        .set_nonblocking(true)
        .map_err(|e| EngineError::Setup(e.to_string()))?;
    let bound = std_socket
        .local_addr()
        .map_err(|e| EngineError::Setup(e.to_string()))?;
    // Registered for readability only: with write interest too, the kernel would queue an
    // epoll event (and the runtime a wake-up) each time a sent datagram is freed, one per
    // forwarded copy.
    // `with_interest` is deprecated because a type could change the descriptor its
    // `as_raw_fd` returns; a `std::net::UdpSocket` owns one descriptor for its whole life,
    // which is what the non-deprecated (`unsafe`) constructor asks the caller to promise.
    #[allow(deprecated)]
    let socket = Arc::new(
        AsyncFd::with_interest(std_socket, Interest::READABLE)
            .map_err(|e| EngineError::Setup(e.to_string()))?,
    );
    Ok((socket, bound))
}

/// Sends one datagram without waiting; false if the socket refused it.
pub(super) fn send(socket: &PeerSocket, data: &[u8], to: SocketAddr) -> bool {
    // A plain non-blocking send: the socket is registered for reading only (see `bind`), and
    // a full send buffer loses the copy rather than waiting.
    socket.get_ref().send_to(data, to).is_ok()
}

/// A datagram read from a peer's socket.
pub(super) struct Datagram {
    pub(super) key: u64,
    pub(super) data: BytesMut,
    pub(super) from: SocketAddr,
    pub(super) at: Instant,
}

/// Reads one peer's socket into its worker's inbound queue.
pub(super) async fn read_loop(key: u64, socket: PeerSocket, inbound: mpsc::Sender<Datagram>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let read = match socket.readable().await {
            Ok(mut ready) => match ready.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                Ok(read) => read,
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
            },
            Err(error) => Err(error),
        };
        match read {
            Ok((n, from)) => {
                let datagram = Datagram {
                    key,
                    data: BytesMut::from(&buf[..n]),
                    from,
                    at: Instant::now(),
                };
                if inbound.send(datagram).await.is_err() {
                    return;
                }
            }
            // Unconnected UDP sockets report little; a transient error must not end the reader.
            Err(error) => {
                tracing::trace!(peer = key, %error, "socket read");
                tokio::task::yield_now().await;
            }
        }
    }
}
