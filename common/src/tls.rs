//! Mutual TLS between the services: every gRPC server verifies its caller's certificate against
//! the deployment's CA and authorises by the identity the certificate names; every client
//! verifies the server the same way. Identities are SPIFFE-style URI SANs in the `talkgroup`
//! trust domain: `spiffe://talkgroup/gateway`, `spiffe://talkgroup/state`,
//! `spiffe://talkgroup/admin` and `spiffe://talkgroup/media/<node-id>`. Host names are not
//! checked: media nodes are dialled by pod IP, and the identity is what a caller is allowed to
//! do, not where it lives.
//!
//! The certificate, key and CA files are re-read when their contents change (cert-manager
//! rotates them in place), so a rotation needs no restart: new connections use the new files,
//! established ones keep the session they negotiated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_util::sync::CancellationToken;

/// The SPIFFE trust domain of every Talkgroup identity.
pub const TRUST_DOMAIN: &str = "talkgroup";
/// How often the certificate files are checked for a rotation.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// How a service speaks gRPC: mutual TLS with its certificate, or plaintext (development).
#[derive(Clone, Debug)]
pub enum Security {
    Mtls(Arc<Tls>),
    Plaintext,
}

/// What a service is to the others, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Gateway,
    State,
    Admin,
    Media(String),
}

/// The kind of an identity, for policies that do not care which media node is calling (not to
/// be confused with a user's role in a channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKind {
    Gateway,
    State,
    Admin,
    Media,
}

impl Identity {
    /// Parses `gateway`, `state`, `admin` or `media/<node-id>`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "gateway" => Some(Self::Gateway),
            "state" => Some(Self::State),
            "admin" => Some(Self::Admin),
            _ => {
                let node = text.strip_prefix("media/")?;
                valid_node_id(node).then(|| Self::Media(node.to_owned()))
            }
        }
    }

    pub fn kind(&self) -> PeerKind {
        match self {
            Self::Gateway => PeerKind::Gateway,
            Self::State => PeerKind::State,
            Self::Admin => PeerKind::Admin,
            Self::Media(_) => PeerKind::Media,
        }
    }

    /// The URI SAN that names this identity in a certificate.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{self}")
    }

    /// The identity a certificate names: its first URI SAN in the Talkgroup trust domain.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let sans = cert.subject_alternative_name().ok()??;
        let prefix = format!("spiffe://{TRUST_DOMAIN}/");
        sans.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()).and_then(Self::parse),
            _ => None,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gateway => f.write_str("gateway"),
            Self::State => f.write_str("state"),
            Self::Admin => f.write_str("admin"),
            Self::Media(node) => write!(f, "media/{node}"),
        }
    }
}

/// A media node id fit for an identity: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_node_id(id: &str) -> bool {
    talkgroup_proto::id::valid(id)
}

/// Where a service's certificate, key and CA bundle live (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Why TLS material could not be used. The message names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The material read from the files, and the identity the certificate names.
struct Material {
    raw: [Vec<u8>; 3],
    identity: Identity,
    server: Arc<ServerConfig>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

/// A service's TLS identity: the current material, re-read when the files change.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Material>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the files: the key must match the certificate, the certificate must
    /// name a Talkgroup identity, and the CA bundle must hold at least one certificate.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let material = read(&files, &provider)?;
        Ok(Arc::new(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(material)),
        }))
    }

    fn material(&self) -> Arc<Material> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The identity this service's certificate names.
    pub fn identity(&self) -> Identity {
        self.material().identity.clone()
    }

    /// The server side: a client certificate is asked for, and the client must prove it
    /// holds its key, but the handshake does not fail on a missing or untrusted one: such a
    /// caller reaches the gRPC layer, where [`crate::authz`] refuses every call with
    /// `UNAUTHENTICATED` (a clear status instead of a reset connection). Whether the chain is
    /// trusted is decided by [`Tls::trusts_client`] once the handshake is done.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.material().server)
    }

    /// Whether a client's certificate chain (leaf first) chains to the CA and is fit for
    /// client authentication, now.
    pub fn trusts_client(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.material()
            .client_verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }

    /// The client side, for dialling a server that must prove `expect`.
    pub fn client_config(&self, expect: Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let material = self.material();
        let verifier = Arc::new(PeerVerifier {
            roots: Arc::clone(&material.roots),
            provider: Arc::clone(&self.provider),
            expect,
        });
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the files; swaps the material in if they changed and are valid. Returns
    /// whether anything changed. Invalid new files leave the old material in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let raw = read_raw(&self.files)?;
        if raw == self.material().raw {
            return Ok(false);
        }
        let fresh = read(&self.files, &self.provider)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fresh.identity != current.identity {
            return Err(TlsError::Invalid {
                path: self.files.cert.display().to_string(),
                what: format!(
                    "the new certificate names {} instead of {}",
                    fresh.identity, current.identity
                ),
            });
        }
        *current = Arc::new(fresh);
        Ok(true)
    }

    /// Checks the files every [`RELOAD_EVERY`] until `shutdown`, logging each rotation.
    pub fn spawn_reload(self: &Arc<Self>, shutdown: CancellationToken) {
        let tls = Arc::clone(self);
        spawn_reload_loop(
            move || {
                tls.reload()
                    .map(|changed| changed.then(|| tls.identity().to_string()))
            },
            shutdown,
        );
    }
}

/// Calls `reload` every [`RELOAD_EVERY`] until `shutdown`; it answers what it now holds when
/// the files changed, nothing when they did not.
fn spawn_reload_loop(
    reload: impl Fn() -> Result<Option<String>, TlsError> + Send + 'static,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match reload() {
                Ok(Some(holder)) => tracing::info!(%holder, "TLS certificate reloaded"),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "TLS files not reloaded; the previous ones stay");
                }
            }
        }
    });
}

/// A public-facing server certificate (the gateway's HTTPS and `wss://` listener): a chain and
/// its key, no client certificates, TLS 1.2 and 1.3, re-read when the files change.
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    provider: Arc<CryptoProvider>,
    current: RwLock<ServerMaterial>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Reads and checks the files; `alpn` is what the listener speaks (`http/1.1`).
    pub fn load(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = read_server_cert(cert, key, &alpn, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            alpn,
            provider,
            current: RwLock::new(current),
        }))
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&current.2)
    }

    /// Re-reads the files; swaps them in if they changed and are valid.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = (read_file(&self.cert)?, read_file(&self.key)?);
        {
            let current = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.0 == cert_pem && current.1 == key_pem {
                return Ok(false);
            }
        }
        let fresh = read_server_cert(&self.cert, &self.key, &self.alpn, &self.provider)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(true)
    }

    /// Checks the files every [`RELOAD_EVERY`] until `shutdown`.
    pub fn spawn_reload(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        spawn_reload_loop(
            move || {
                this.reload()
                    .map(|changed| changed.then(|| this.cert.display().to_string()))
            },
            shutdown,
        );
    }
}

type ServerMaterial = (Vec<u8>, Vec<u8>, Arc<ServerConfig>);

fn read_server_cert(
    cert: &Path,
    key: &Path,
    alpn: &[Vec<u8>],
    provider: &Arc<CryptoProvider>,
) -> Result<ServerMaterial, TlsError> {
    let cert_pem = read_file(cert)?;
    let key_pem = read_file(key)?;
    let chain = parse_chain(&cert_pem, cert)?;
    let private = parse_key(&key_pem, key)?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| invalid(key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = alpn.to_vec();
    Ok((cert_pem, key_pem, Arc::new(config)))
}

/// The TLS flags every service takes.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// This service's certificate chain (PEM). Its URI SAN `spiffe://talkgroup/<identity>`
    /// says what it is: gateway, state, admin or media/<node-id>.
    #[arg(long, env = "PTT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "PTT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA bundle (PEM) that every peer's certificate must chain to.
    #[arg(long, env = "PTT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Serve and dial gRPC without TLS. For development only: anyone who reaches a port can
    /// then make any call.
    #[arg(long, env = "PTT_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// Plaintext for in-process tests.
    pub fn plaintext() -> Self {
        Self {
            insecure_plaintext: true,
            ..Self::default()
        }
    }

    /// Mutual TLS with these files.
    pub fn files(files: &TlsFiles) -> Self {
        Self {
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            tls_ca: Some(files.ca.clone()),
            insecure_plaintext: false,
        }
    }

    /// Either all three files or `--insecure-plaintext`, never both.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca, self.insecure_plaintext) {
            (Some(_), Some(_), Some(_), false) | (None, None, None, true) => Ok(()),
            (_, _, _, true) => {
                Err("--insecure-plaintext cannot be combined with --tls-cert/--tls-key/--tls-ca".into())
            }
            _ => Err(
                "gRPC needs --tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure-plaintext for development"
                    .into(),
            ),
        }
    }

    /// Loads the files (or not, for plaintext) and checks that the certificate names an
    /// identity `fits` accepts; plaintext is announced with a warning.
    pub fn security(
        &self,
        service: &str,
        fits: impl Fn(&Identity) -> bool,
    ) -> Result<Security, String> {
        self.validate()?;
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            tracing::warn!(
                service,
                "gRPC runs WITHOUT TLS (--insecure-plaintext): anything that reaches its ports can \
                 make any call; use this for local development only"
            );
            return Ok(Security::Plaintext);
        };
        let tls = Tls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        })
        .map_err(|e| e.to_string())?;
        let identity = tls.identity();
        if !fits(&identity) {
            return Err(format!(
                "{}: the certificate names {identity}, which is not an identity for {service}",
                cert.display()
            ));
        }
        tracing::info!(service, %identity, "gRPC over mutual TLS");
        Ok(Security::Mtls(tls))
    }
}

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this identity.
    Exactly(Identity),
    /// Any identity of this kind (any media node).
    Kind(PeerKind),
}

impl Expect {
    pub fn accepts(&self, identity: &Identity) -> bool {
        match self {
            Self::Exactly(expected) => expected == identity,
            Self::Kind(kind) => identity.kind() == *kind,
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_raw(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    Ok([
        read_file(&files.cert)?,
        read_file(&files.key)?,
        read_file(&files.ca)?,
    ])
}

fn invalid(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn read(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Material, TlsError> {
    let raw = read_raw(files)?;
    let chain = parse_chain(&raw[0], &files.cert)?;
    let identity = Identity::from_certificate(&chain[0]).ok_or_else(|| {
        invalid(
            &files.cert,
            format!("the certificate names no spiffe://{TRUST_DOMAIN}/... identity (URI SAN)"),
        )
    })?;
    let key = parse_key(&raw[1], &files.key)?;
    let roots = parse_roots(&raw[2], &files.ca)?;
    let roots = Arc::new(roots);
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&roots),
        Arc::clone(provider),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let lenient = Arc::new(Lenient {
        strict: Arc::clone(&client_verifier),
    });
    let mut server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(lenient)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| invalid(&files.key, format!("does not fit the certificate: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        raw,
        identity,
        server: Arc::new(server),
        client_verifier,
        chain,
        key,
        roots,
    })
}

/// A PEM certificate chain, leaf first; at least one certificate.
fn parse_chain(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| invalid(path, "not a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(chain)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| invalid(path, "not a PEM private key"))
}

/// A PEM CA bundle; at least one usable certificate.
fn parse_roots(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pem) {
        let ca = ca.map_err(|_| invalid(path, "not a PEM certificate bundle"))?;
        roots
            .add(ca)
            .map_err(|e| invalid(path, format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(path, "no CA certificate in the file"));
    }
    Ok(roots)
}

/// Reads and checks a PEM CA bundle.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    parse_roots(&read_file(path)?, path)
}

/// A client certificate and key, PEM files, for a backing store that asks for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The client side towards a backing store (Redis, PostgreSQL): the server must present a
/// certificate for the host name dialled that chains to the CA bundle at `ca` (full
/// verification, as `verify-full`), and `client`, when given, is presented in turn.
pub fn verifying_client_config(
    ca: &Path,
    client: Option<&ClientCert>,
) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(read_roots(ca)?);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some(files) => {
            let chain = parse_chain(&read_file(&files.cert)?, &files.cert)?;
            let key = parse_key(&read_file(&files.key)?, &files.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(&files.key, format!("does not fit the certificate: {e}")))
        }
    }
}

/// Checks that `cert` and `key` are PEM files that fit together (a store client certificate
/// handed on to a library that takes PEM bytes).
pub fn check_client_cert(files: &ClientCert) -> Result<(), TlsError> {
    let chain = parse_chain(&read_file(&files.cert)?, &files.cert)?;
    let key = parse_key(&read_file(&files.key)?, &files.key)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| invalid(&files.key, "unsupported private key"))?;
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|e| invalid(&files.key, format!("does not fit the certificate: {e}")))
}

/// The handshake side of client authentication: the client's proof of possession of its key
/// is checked as usual, but its chain is accepted here and judged after the handshake (see
/// [`Tls::server_config`]).
#[derive(Debug)]
struct Lenient {
    strict: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for Lenient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.strict.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.strict.supported_verify_schemes()
    }
}

/// Verifies a server's certificate against the CA and its identity against what the client
/// expects; the host name is not consulted (see the module docs).
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expect: Expect,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match Identity::from_certificate(end_entity) {
            Some(identity) if self.expect.accepts(&identity) => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_and_print() {
        for text in ["gateway", "state", "admin", "media/node-1.a_b"] {
            let id = Identity::parse(text).unwrap();
            assert_eq!(id.to_string(), text);
            assert_eq!(id.uri(), format!("spiffe://talkgroup/{text}"));
        }
        for bad in [
            "",
            "media/",
            "media/a/b",
            "root",
            "media/ x",
            &format!("media/{}", "n".repeat(65)),
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn expectations() {
        let node = Identity::Media("a".into());
        assert!(Expect::Kind(PeerKind::Media).accepts(&node));
        assert!(!Expect::Kind(PeerKind::Media).accepts(&Identity::Gateway));
        assert!(Expect::Exactly(Identity::State).accepts(&Identity::State));
        assert!(!Expect::Exactly(Identity::Media("b".into())).accepts(&node));
    }
}
