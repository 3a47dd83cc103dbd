//! The backing stores over TLS: a real `redis-server` with a TLS port that asks for client
//! certificates and an ACL user, and a real PostgreSQL with `ssl=on` that refuses plaintext
//! TCP. state-svc keeps its floor state in the one and copies its audit trail to the other,
//! verifying both servers against a throwaway CA.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use state_svc::config::StoreKind;
use support::{Backend, TestServer, unique_prefix};
use talkgroup_common::devcerts::DevCa;
use talkgroup_common::tls::{self, ClientCert, Identity};
use testkit::{PostgresServer, RedisServer, RedisTls, wait_until};

const PASSWORD: &str = "redis-acl-password-for-tests";

struct Files {
    dir: PathBuf,
    ca: PathBuf,
    server: ClientCert,
    client: ClientCert,
    other_ca: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, a server certificate for 127.0.0.1, a client certificate, and a second CA that
/// signed neither.
fn files(name: &str) -> Files {
    let dir = std::env::temp_dir().join(format!("store-tls-{}-{name}", std::process::id()));
    let ca = DevCa::new("store test CA").unwrap();
    let server = ca
        .write(
            &dir,
            "server",
            &Identity::State,
            &["127.0.0.1", "localhost"],
        )
        .unwrap();
    let client = ca.write(&dir, "client", &Identity::State, &[]).unwrap();
    let other = DevCa::new("another CA").unwrap();
    let other_ca = dir.join("other-ca.crt");
    std::fs::write(&other_ca, other.ca_pem()).unwrap();
    Files {
        ca: server.ca.clone(),
        server: ClientCert {
            cert: server.cert,
            key: server.key,
        },
        client: ClientCert {
            cert: client.cert,
            key: client.key,
        },
        dir,
        other_ca,
    }
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

async fn pg_tls(url: &str, ca: &Path) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config = tls::verifying_client_config(ca, None).unwrap();
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let url = format!("{url}?sslmode=require");
    let (client, connection) = tokio_postgres::connect(&url, connector).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_state_in_redis_over_tls_and_audit_in_postgres_over_tls() {
    let files = files("both");
    let redis = RedisServer::start_tls(RedisTls {
        cert: files.server.cert.clone(),
        key: files.server.key.clone(),
        ca: files.ca.clone(),
        port: 0,
    })
    .unwrap();
    // An ACL user for Talkgroup; the default user is switched off, so nothing works without
    // the password.
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "talkgroup",
            "on",
            &format!(">{PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ])
        .unwrap();
    redis.cli(&["ACL", "SETUSER", "default", "off"]).unwrap();
    let (cert, key) = (
        std::fs::read_to_string(&files.server.cert).unwrap(),
        std::fs::read_to_string(&files.server.key).unwrap(),
    );
    let pg = tokio::task::spawn_blocking(move || PostgresServer::start_tls(&cert, &key))
        .await
        .unwrap()
        .unwrap();
    // The database refuses plaintext TCP, so whatever arrives came over TLS.
    assert!(
        tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .is_err()
    );

    let mut config = Backend::Memory.config("tls");
    config.store = Some(StoreKind::Redis);
    config.redis_url = redis.tls_url();
    config.key_prefix = unique_prefix("tls");
    config.membership_channel = format!("{}:membership", config.key_prefix);
    config.redis_username = Some("talkgroup".into());
    config.redis_password_file = Some(write_secret(&files.dir, "redis-password", PASSWORD));
    config.redis_ca = Some(files.ca.clone());
    config.redis_client_cert = Some(files.client.cert.clone());
    config.redis_client_key = Some(files.client.key.clone());
    config.postgres_url = Some(pg.url());
    config.postgres_ca = Some(files.ca.clone());
    config.audit_sweep_ms = 100;
    assert!(!format!("{config:?}").contains(PASSWORD));

    let server = TestServer::start(config.clone()).await;
    let mut c = server.clients().await;
    let sid = c.join("alice", "ops").await;
    let granted = c.acquire("ops", &sid, 0).await;
    let epoch = granted.holder.as_ref().unwrap().epoch;
    assert_eq!(
        support::holder_user(&c.floor("ops").await.holder),
        "u-alice"
    );
    assert!(c.release("ops", &sid, epoch).await.released);
    assert!(c.floor("ops").await.holder.is_none());

    // Both floor events reach PostgreSQL over TLS.
    let url = pg.url();
    let ca = files.ca.clone();
    wait_until(Duration::from_secs(30), "two audit rows", || {
        let (url, ca) = (url.clone(), ca.clone());
        async move {
            let Ok(client) = pg_tls(&url, &ca).await else {
                return false;
            };
            let count: Option<i64> = client
                .query_one(
                    "SELECT count(*) FROM floor_events WHERE channel_id = 'ops'",
                    &[],
                )
                .await
                .ok()
                .and_then(|row| row.try_get(0).ok());
            count == Some(2)
        }
    })
    .await
    .unwrap();
    server.stop().await;

    // A Redis certificate from a CA the service does not trust: no call gets through, and
    // the reply says only that the store is unavailable.
    let mut untrusting = config.clone();
    untrusting.redis_ca = Some(files.other_ca.clone());
    untrusting.postgres_url = None;
    let server = TestServer::start(untrusting).await;
    let mut c = server.clients().await;
    let refused = c
        .session
        .create_session(talkgroup_proto::state::v1::CreateSessionRequest {
            user_id: "bob".into(),
            user_name: "bob".into(),
            gateway_id: "gw-test".into(),
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(!refused.message().contains("certificate"), "{refused:?}");
    server.stop().await;

    // Without the client certificate Redis ends the handshake.
    let mut anonymous = config.clone();
    anonymous.redis_client_cert = None;
    anonymous.redis_client_key = None;
    anonymous.postgres_url = None;
    let server = TestServer::start(anonymous).await;
    let mut c = server.clients().await;
    let refused = c
        .session
        .create_session(talkgroup_proto::state::v1::CreateSessionRequest {
            user_id: "carol".into(),
            user_name: "carol".into(),
            gateway_id: "gw-test".into(),
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    server.stop().await;
}

#[test]
fn store_files_are_checked_at_start() {
    let files = files("check");
    let mut config = Backend::Memory.config("check");
    config.redis_url = Some("rediss://127.0.0.1:1".into());
    config.redis_ca = Some(files.dir.join("missing.crt"));
    let error = config.redis_options().unwrap_err().to_string();
    assert!(error.contains("missing.crt"), "{error}");
    config.redis_ca = Some(files.ca.clone());
    config.redis_client_cert = Some(files.client.cert.clone());
    config.redis_client_key = Some(files.server.key.clone());
    let error = config.redis_options().unwrap_err().to_string();
    assert!(error.contains("does not fit"), "{error}");
    config.redis_client_key = Some(files.client.key.clone());
    assert!(config.redis_options().is_ok());
    config.postgres_url = Some("postgres://tg@127.0.0.1:1/postgres".into());
    config.postgres_ca = Some(files.server.key.clone());
    assert!(config.postgres().is_err());
    config.postgres_ca = Some(files.ca.clone());
    assert!(config.postgres().unwrap().is_some_and(|pg| pg.tls()));
}
