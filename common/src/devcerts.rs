//! A throwaway CA and service certificates, so the local stack (`scripts/dev`) and the test
//! harness run with mutual TLS as production does. Never for production: the CA key lives in
//! memory only and the certificates last a week.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::tls::{Identity, TlsFiles};

/// How long the throwaway certificates are valid.
const VALID_DAYS: i64 = 7;

/// A CA that issues service certificates.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate naming `identity` (and `names` as DNS or IP SANs), for both TLS
    /// server and client use.
    pub fn issue(&self, identity: &Identity, names: &[&str]) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().try_into()?));
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `identity` and writes `<name>.crt`, `<name>.key` and `ca.crt`
    /// into `dir` (the key readable by its owner only). Each file is replaced whole (written
    /// beside it, then renamed), so a service reading them meanwhile never sees half of one.
    pub fn write(
        &self,
        dir: &Path,
        name: &str,
        identity: &Identity,
        names: &[&str],
    ) -> std::io::Result<TlsFiles> {
        let issued = self
            .issue(identity, names)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::create_dir_all(dir)?;
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.crt"),
        };
        replace(&files.key, issued.key_pem.as_bytes(), 0o600)?;
        replace(&files.cert, issued.cert_pem.as_bytes(), 0o644)?;
        replace(&files.ca, self.ca_pem().as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// One throwaway CA per test process and a certificate per identity, issued on first use,
/// so in-process service tests run with mutual TLS as production does.
#[derive(Debug)]
pub struct TestPki {
    ca: DevCa,
    dir: std::path::PathBuf,
    issued: std::sync::Mutex<std::collections::HashMap<Identity, TlsFiles>>,
}

impl TestPki {
    /// The process's PKI (its files under the temporary directory, named by process id).
    pub fn global() -> &'static Self {
        static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("talkgroup-pki-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self {
                ca: DevCa::new("Talkgroup in-process test CA").expect("test CA"),
                dir,
                issued: std::sync::Mutex::new(std::collections::HashMap::new()),
            }
        })
    }

    /// The files of `identity`'s certificate (for 127.0.0.1 and localhost).
    pub fn files(&self, identity: &Identity) -> TlsFiles {
        let mut issued = self
            .issued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(files) = issued.get(identity) {
            return files.clone();
        }
        let name = identity.to_string().replace('/', "-");
        let files = self
            .ca
            .write(&self.dir, &name, identity, &["127.0.0.1", "localhost"])
            .expect("write a test certificate");
        issued.insert(identity.clone(), files.clone());
        files
    }

    /// The `--tls-*` flags of a service with `identity`.
    pub fn args(&self, identity: &Identity) -> crate::tls::TlsArgs {
        crate::tls::TlsArgs::files(&self.files(identity))
    }

    /// How a client with `identity` dials.
    pub fn security(&self, identity: &Identity) -> crate::tls::Security {
        crate::tls::Security::Mtls(
            crate::tls::Tls::load(self.files(identity)).expect("load a test certificate"),
        )
    }

    /// A gRPC channel to `addr` as `identity`, expecting the server to prove `server`.
    pub fn channel(
        &self,
        addr: std::net::SocketAddr,
        identity: &Identity,
        server: Identity,
    ) -> tonic::transport::Channel {
        crate::grpc::channel(
            &format!("http://{addr}"),
            None,
            &self.security(identity),
            crate::tls::Expect::Exactly(server),
        )
        .expect("a test channel")
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Writes `bytes` to a new file beside `path` with `mode`, then renames it over `path`.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    let temp = std::path::PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Tls;

    #[test]
    fn issued_certificates_load_with_their_identity() {
        let dir = std::env::temp_dir().join(format!("devcerts-{}", std::process::id()));
        let ca = DevCa::new("test CA").unwrap();
        let node = Identity::Media("node-7".into());
        let files = ca
            .write(&dir, "media", &node, &["127.0.0.1", "localhost"])
            .unwrap();
        let tls = Tls::load(files).unwrap();
        assert_eq!(tls.identity(), node);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
