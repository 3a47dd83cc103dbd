//! Harness for state-svc's service tests: the real server on `127.0.0.1:0` with mutual TLS (a
//! throwaway CA per test binary), a real Redis shared by the test binary (one key prefix per
//! test), and typed gRPC clients, each dialling with the identity its calls need.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use state_svc::{Config, StoreKind};
use talkgroup_common::devcerts::TestPki;
use talkgroup_common::tls::Identity;
use talkgroup_proto::state::v1 as pb;
use testkit::RedisServer;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use pb::access_service_client::AccessServiceClient;
pub use pb::channel_service_client::ChannelServiceClient;
pub use pb::floor_service_client::FloorServiceClient;
pub use pb::media_registry_service_client::MediaRegistryServiceClient;
pub use pb::session_service_client::SessionServiceClient;
pub use pb::sync_service_client::SyncServiceClient;

/// A channel to the state-svc at `addr` as `identity`, over mutual TLS.
pub fn channel_as(addr: SocketAddr, identity: &Identity) -> Channel {
    TestPki::global().channel(addr, identity, Identity::State)
}

/// The Redis server of this test binary.
pub fn redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(|| RedisServer::start().expect("start redis-server"))
}

/// The Sentinel-managed Redis of this test binary (a master, a replica, three Sentinels).
pub fn sentinels() -> &'static testkit::RedisSentinels {
    static SENTINELS: OnceLock<testkit::RedisSentinels> = OnceLock::new();
    SENTINELS.get_or_init(|| testkit::RedisSentinels::start().expect("start redis under sentinel"))
}

/// The Redis Cluster of this test binary (three masters with a replica each).
pub fn cluster() -> &'static testkit::RedisCluster {
    static CLUSTER: OnceLock<testkit::RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| testkit::RedisCluster::start().expect("start a redis cluster"))
}

/// The `redis+sentinel://` URL of `set`.
pub fn sentinel_url(set: &testkit::RedisSentinels) -> String {
    format!(
        "redis+sentinel://{}/{}",
        set.addresses().join(","),
        set.master_name
    )
}

/// A key prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        name
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    /// Redis through Sentinel.
    Sentinel,
    /// A Redis Cluster.
    Cluster,
}

impl Backend {
    /// A configuration for this backend with short timings, so expiry tests run quickly.
    pub fn config(self, name: &str) -> Config {
        let mut config = Config::for_tests();
        config.tls = TestPki::global().args(&Identity::State);
        config.lease_ms = 5_000;
        config.sweep_interval_ms = 20;
        config.node_dead_after_ms = 400;
        config.node_heartbeat_ms = 100;
        config.node_forget_after_ms = 1_500;
        if self != Backend::Memory {
            config.store = Some(StoreKind::Redis);
            config.redis_url = Some(match self {
                Backend::Sentinel => sentinel_url(sentinels()),
                Backend::Cluster => cluster().url(),
                _ => redis().url(),
            });
            config.key_prefix = unique_prefix(name);
            config.membership_channel = format!("{}:membership", config.key_prefix);
        }
        config
    }
}

/// A state-svc running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The Redis key prefix (the default one for the memory store).
    pub prefix: String,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), state_svc::RunError>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let prefix = config.key_prefix.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(state_svc::run(config, listener, shutdown.clone()));
        Self {
            addr,
            prefix,
            shutdown,
            handle,
        }
    }

    pub async fn clients(&self) -> Clients {
        Clients::connect(self.addr).await
    }

    /// A channel to this server as `identity`.
    pub fn channel_as(&self, identity: &Identity) -> Channel {
        channel_as(self.addr, identity)
    }

    /// The registry as media node `node` (the only one that may register, heartbeat or drain
    /// it).
    pub fn registry_as(&self, node: &str) -> MediaRegistryServiceClient<Channel> {
        MediaRegistryServiceClient::new(self.channel_as(&Identity::Media(node.into())))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

#[derive(Clone)]
pub struct Clients {
    pub floor: FloorServiceClient<Channel>,
    pub channel: ChannelServiceClient<Channel>,
    pub session: SessionServiceClient<Channel>,
    pub registry: MediaRegistryServiceClient<Channel>,
    pub access: AccessServiceClient<Channel>,
    pub sync: SyncServiceClient<Channel>,
    /// The admin's clients, for the calls only an admin may make (grants, events, channel
    /// configuration).
    pub admin_channel: ChannelServiceClient<Channel>,
    pub admin_access: AccessServiceClient<Channel>,
}

impl Clients {
    /// The clients a gateway has.
    pub async fn connect(addr: SocketAddr) -> Self {
        let channel = channel_as(addr, &Identity::Gateway);
        Self {
            floor: FloorServiceClient::new(channel.clone()),
            channel: ChannelServiceClient::new(channel.clone()),
            session: SessionServiceClient::new(channel.clone()),
            registry: MediaRegistryServiceClient::new(channel.clone()),
            access: AccessServiceClient::new(channel.clone()),
            sync: SyncServiceClient::new(channel),
            admin_channel: ChannelServiceClient::new(channel_as(addr, &Identity::Admin)),
            admin_access: AccessServiceClient::new(channel_as(addr, &Identity::Admin)),
        }
    }

    /// Creates a session for `user` and joins it to `channel`.
    pub async fn join(&mut self, user: &str, channel: &str) -> String {
        let sid = self.session(user).await;
        self.session
            .join_channel(pb::JoinChannelRequest {
                session_id: sid.clone(),
                channel_id: channel.into(),
            })
            .await
            .unwrap();
        sid
    }

    pub async fn session(&mut self, user: &str) -> String {
        self.session
            .create_session(pb::CreateSessionRequest {
                user_id: format!("u-{user}"),
                user_name: user.into(),
                gateway_id: "gw-test".into(),
                ttl_ms: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .session_id
    }

    pub async fn acquire(
        &mut self,
        channel: &str,
        sid: &str,
        priority: u32,
    ) -> pb::AcquireFloorResponse {
        self.floor
            .acquire_floor(pb::AcquireFloorRequest {
                channel_id: channel.into(),
                session_id: sid.into(),
                priority,
                min_epoch: 0,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn release(
        &mut self,
        channel: &str,
        sid: &str,
        epoch: u64,
    ) -> pb::ReleaseFloorResponse {
        self.floor
            .release_floor(pb::ReleaseFloorRequest {
                channel_id: channel.into(),
                session_id: sid.into(),
                epoch,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn floor(&mut self, channel: &str) -> pb::GetFloorResponse {
        self.floor
            .get_floor(pb::GetFloorRequest {
                channel_id: channel.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Opens a watch on `channels` and returns it once every snapshot has arrived.
    pub async fn watch(&mut self, channels: &[&str]) -> Watch {
        self.try_watch(channels)
            .await
            .expect("watch stream healthy")
    }

    /// A watch of `channels` with their snapshots read, or `None` when the stream fails
    /// first (state-svc's pub/sub not connected yet, as right after Redis came back).
    pub async fn try_watch(&mut self, channels: &[&str]) -> Option<Watch> {
        self.try_watch_topics(pb::TopicSet {
            channel_ids: channels.iter().map(|c| (*c).to_owned()).collect(),
            ..Default::default()
        })
        .await
    }

    /// Opens a watch on users' topics and returns it once each user's grants have arrived.
    #[allow(dead_code)]
    pub async fn watch_users(&mut self, users: &[&str]) -> Watch {
        self.try_watch_topics(pb::TopicSet {
            user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .expect("watch stream healthy")
    }

    /// A watch of `topics` with the state of each read (a channel's snapshot, a user's
    /// grants, an existing sync session's state).
    pub async fn try_watch_topics(&mut self, topics: pb::TopicSet) -> Option<Watch> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let states = topics.channel_ids.len() + topics.user_ids.len();
        tx.send(pb::WatchRequest {
            action: Some(pb::watch_request::Action::Subscribe(topics)),
        })
        .await
        .unwrap();
        let stream = self
            .channel
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut watch = Watch {
            stream,
            _requests: tx,
            grants_seen: std::collections::HashMap::new(),
        };
        for _ in 0..states {
            match watch.next_or_end().await?.event {
                Some(pb::watch_event::Event::Snapshot(_)) => {}
                Some(pb::watch_event::Event::Grants(g)) => {
                    watch.grants_seen.insert(g.user_id, g.version);
                }
                other => panic!("expected a topic's state first, got {other:?}"),
            }
        }
        Some(watch)
    }
}

pub fn holder_user(holder: &Option<pb::FloorHolder>) -> String {
    holder
        .as_ref()
        .and_then(|h| h.speaker.as_ref())
        .map(|s| s.user_id.clone())
        .unwrap_or_default()
}

pub struct Watch {
    stream: tonic::Streaming<pb::WatchEvent>,
    _requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    /// The highest grants version seen per user: a resync sends the same grants again.
    grants_seen: std::collections::HashMap<String, u64>,
}

impl Watch {
    /// The next event, failing the test if none arrives within five seconds.
    pub async fn next(&mut self) -> pb::watch_event::Event {
        let item = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
            .await
            .expect("watch event within 5 s")
            .expect("watch stream open")
            .expect("watch stream healthy");
        item.event.expect("event set")
    }

    /// The next item as the stream gives it: `Err` when nothing came within five seconds.
    #[allow(dead_code)]
    pub async fn next_raw(
        &mut self,
    ) -> Result<Option<Result<pb::WatchEvent, tonic::Status>>, tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(5), self.stream.next()).await
    }

    /// The next item, or None once the stream has ended (with an error or cleanly).
    pub async fn next_or_end(&mut self) -> Option<pb::WatchEvent> {
        match tokio::time::timeout(Duration::from_secs(5), self.stream.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            _ => None,
        }
    }

    /// The next floor change, skipping membership events and snapshots.
    pub async fn next_floor(&mut self) -> pb::FloorChanged {
        loop {
            if let pb::watch_event::Event::Floor(f) = self.next().await {
                return f;
            }
        }
    }

    /// The next move of a channel to another node, skipping everything else.
    pub async fn next_moved(&mut self) -> pb::ChannelMoved {
        loop {
            if let pb::watch_event::Event::Moved(m) = self.next().await {
                return m;
            }
        }
    }

    /// The next newer grants of a user's topic (receivers apply the highest version),
    /// skipping everything else.
    #[allow(dead_code)]
    pub async fn next_grants(&mut self) -> pb::UserGrants {
        loop {
            if let pb::watch_event::Event::Grants(g) = self.next().await {
                let seen = self.grants_seen.entry(g.user_id.clone()).or_default();
                if g.version > *seen {
                    *seen = g.version;
                    return g;
                }
            }
        }
    }

    /// The next sync session change, skipping snapshots and everything else.
    #[allow(dead_code)]
    pub async fn next_sync(&mut self) -> pb::SyncState {
        loop {
            if let pb::watch_event::Event::Sync(s) = self.next().await {
                return s;
            }
        }
    }

    /// The next membership change, skipping floor events and snapshots.
    pub async fn next_membership(&mut self) -> pb::MembershipChanged {
        loop {
            if let pb::watch_event::Event::Membership(m) = self.next().await {
                return m;
            }
        }
    }
}
