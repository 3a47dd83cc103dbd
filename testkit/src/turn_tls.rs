//! TURN over TLS for the `webrtc` crate's client peers, which speak TURN over UDP only: a
//! local UDP port whose datagrams (STUN messages and ChannelData) are carried over one TLS
//! connection to the relay's TLS port, framed as RFC 8656 section 12 says for stream
//! transports (STUN messages back to back, ChannelData padded to a multiple of four bytes),
//! and whatever the relay sends back is split into datagrams again. coturn sees an ordinary
//! TURN-over-TLS client: the allocation, its permissions and the credentials are all the
//! peer's own, and every packet between the peer and the relay crosses the TLS connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// The most a STUN message or ChannelData frame may hold here (a UDP datagram).
const MAX_FRAME: usize = 65_535;

/// A running bridge; it stops when dropped.
#[derive(Debug)]
pub struct TlsBridge {
    /// Where the peer sends its TURN traffic (`turn:<addr>?transport=udp`).
    pub local: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The length on the stream of the frame at the start of `buf`, once its header is there:
/// STUN (first two bits 00) is 20 bytes of header plus its length; ChannelData (01) is 4 plus
/// its length, padded to four bytes on a stream.
fn frame_len(buf: &[u8]) -> Option<Result<(usize, usize)>> {
    if buf.len() < 4 {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    Some(match buf[0] >> 6 {
        0 => Ok((20 + length, 20 + length)),
        1 => Ok((4 + length, (4 + length).div_ceil(4) * 4)),
        _ => Err(anyhow::anyhow!(
            "neither STUN nor ChannelData from the relay"
        )),
    })
}

impl TlsBridge {
    /// Connects to the relay's TLS port at `relay` (verifying its certificate for `name`
    /// against the CA bundle at `ca`) and listens for the peer on a free loopback UDP port.
    /// Sockets are made on the calling runtime's threads (a network namespace's, say).
    pub async fn start(relay: SocketAddr, name: &str, ca: &std::path::Path) -> Result<Self> {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots.add(cert.context("CA bundle")?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())?;
        let tcp = TcpStream::connect(relay)
            .await
            .with_context(|| format!("cannot reach the relay's TLS port {relay}"))?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS handshake with the relay")?;
        let udp = UdpSocket::bind("127.0.0.1:0").await?;
        let local = udp.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(error) = pump(udp, tls).await {
                eprintln!("TURN/TLS bridge stopped: {error:#}");
            }
        });
        Ok(Self { local, task })
    }

    /// The `turn:` URL the peer is given in place of the relay's `turns:` one.
    pub fn url(&self) -> String {
        format!("turn:{}?transport=udp", self.local)
    }
}

async fn pump(udp: UdpSocket, tls: tokio_rustls::client::TlsStream<TcpStream>) -> Result<()> {
    let (mut from_relay, mut to_relay) = tokio::io::split(tls);
    let mut datagram = vec![0u8; MAX_FRAME];
    let mut stream = Vec::with_capacity(2 * MAX_FRAME);
    let mut chunk = vec![0u8; MAX_FRAME];
    let mut peer: Option<SocketAddr> = None;
    loop {
        tokio::select! {
            received = udp.recv_from(&mut datagram) => {
                let (n, from) = received?;
                peer = Some(from);
                let frame = &datagram[..n];
                to_relay.write_all(frame).await?;
                // ChannelData is padded to four bytes on a stream; STUN already is.
                let padding = (4 - n % 4) % 4;
                if frame.first().is_some_and(|b| b >> 6 == 1) && padding > 0 {
                    to_relay.write_all(&[0u8; 3][..padding]).await?;
                }
                to_relay.flush().await?;
            }
            read = from_relay.read(&mut chunk) => {
                let n = read?;
                if n == 0 {
                    bail!("the relay closed the TLS connection");
                }
                stream.extend_from_slice(&chunk[..n]);
                while let Some(lengths) = frame_len(&stream) {
                    let (len, on_stream) = lengths?;
                    if stream.len() < on_stream {
                        break;
                    }
                    if let Some(peer) = peer {
                        udp.send_to(&stream[..len], peer).await?;
                    }
                    stream.drain(..on_stream);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::frame_len;

    #[test]
    fn frames_are_measured_as_a_stream_carries_them() {
        // A STUN binding request header with 8 bytes of attributes.
        let stun = [0x00, 0x01, 0x00, 0x08];
        assert_eq!(frame_len(&stun).unwrap().unwrap(), (28, 28));
        // ChannelData on channel 0x4000 with 5 bytes: padded to 12 on the stream.
        let data = [0x40, 0x00, 0x00, 0x05];
        assert_eq!(frame_len(&data).unwrap().unwrap(), (9, 12));
        assert!(frame_len(&[0x40, 0x00]).is_none());
        assert!(frame_len(&[0xc0, 0, 0, 0]).unwrap().is_err());
    }
}
