//! The Redis store: production state for any number of state-svc replicas.
//!
//! - `keys`: every key name; `scripts`: every Lua script; `wire`: the JSON they answer with;
//!   `listener`: the pub/sub connection that feeds the hub.
//! - The hot path uses one shared multiplexed connection ([`ConnectionManager`], which
//!   reconnects by itself, or the cluster connection under Redis Cluster); pub/sub has its
//!   own connection.
//! - Under Cluster every script and every pipeline touches one slot; what spans slots (a
//!   session and the deadline index, say) is separate calls, ordered so that an interruption
//!   leaves something the sweeper finishes.
//! - Every call is bounded by `timeout`: when Redis is unreachable a call fails with
//!   `Unavailable` (so nobody is granted the floor) instead of hanging, and the next call after
//!   Redis returns succeeds without a restart.

mod access;
mod fields;
mod floor;
mod housekeeping;
mod keys;
mod listener;
mod registry;
pub mod scripts;
mod session;
mod sync;
mod target;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::keys::Keys;
use self::listener::{Listener, RECONCILE_QUEUE, ReconcileRequest};
use self::scripts::ChannelScripts;
pub use self::target::{Conn, Target};
use self::wire::{
    StoredMember, Verdict, WireAcquire, WireClaim, WireEmergency, WireExpire, WireGrants,
    WireLeave, WireRelease, WireRenew, WireState, parse,
};
use crate::domain::{
    AcquireOutcome, Acquired, ChannelConfig, ChannelId, ChannelState, EmergencyHolder, EventId,
    EventInfo, FloorRefusal, GrantChange, GrantsUpdate, LeaveOutcome, MAX_GRANTS_PER_USER,
    MediaNode, MoveReason, NewSession, NodeId, NodeRegistration, Placement, ReleaseOutcome,
    RemoveOutcome, RenewOutcome, Renewed, Resume, Role, Session, SessionId, Speaker, SyncId, Topic,
    UserGrants, UserId, choose_node, nodes_to_empty, nodes_to_forget, now_ms, rules,
};
use crate::error::{STORE_ERRORS, StoreError};
use crate::hub::Hub;
use crate::store::{SessionStore, StoreSettings, SweepReport, event_channel_list};
use crate::sync::SyncSession;

/// How the Redis store connects and bounds its work.
#[derive(Clone)]
pub struct RedisOptions {
    /// The server, credentials and TLS.
    pub connect: crate::connect::RedisConnect,
    /// Prefix of every key (default `ptt`); tests use one per test.
    pub key_prefix: String,
    /// Upper bound of every Redis call.
    pub timeout: Duration,
    /// Approximate length each channel's audit stream is trimmed to; 0: not at all (the
    /// audit writer trims what it has copied).
    pub audit_maxlen: u32,
    /// With the audit writer (`audit_maxlen` 0): uncopied entries a channel's stream may hold
    /// before it takes no more denials (they are only counted).
    pub audit_backlog_max: u32,
    /// A channel's denial window: at most `scripts::DENIALS_PER_WINDOW` denials are appended
    /// per window, the rest counted into one entry.
    pub audit_denial_window_ms: u32,
    /// Pub/sub channel of control-plane membership updates.
    pub membership_channel: String,
    /// Replicas that must hold a grant before it is answered (`WAIT`); 0: none.
    pub wait_replicas: u32,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("connect", &self.connect)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("audit_maxlen", &self.audit_maxlen)
            .field("audit_backlog_max", &self.audit_backlog_max)
            .field("membership_channel", &self.membership_channel)
            .finish()
    }
}

/// Extra time a floor hash outlives its maximum talk time before Redis collects it.
const GC_GRACE_MS: u32 = 60_000;
/// Extra time session keys outlive their expiry, so the sweeper still finds their channels.
const SESSION_GRACE_MS: i64 = 3_600_000;
/// Entries the sweeper takes from a deadline index per pass.
const SWEEP_BATCH: isize = 256;

#[derive(Debug, Clone)]
pub struct RedisStore {
    target: Target,
    keys: Keys,
    settings: StoreSettings,
    timeout: Duration,
    /// A sync session's audit stream length cap (`0`: none, the writer trims).
    audit_maxlen: String,
    /// The channel scripts' audit policy (`scripts::audit_policy`).
    audit_policy: String,
    listener: mpsc::Sender<ReconcileRequest>,
    wait_replicas: u32,
    /// When the registry was last looked at for dead and draining nodes (ms).
    nodes_swept_at: Arc<std::sync::atomic::AtomicI64>,
    /// The channel scripts: publishing on sharded pub/sub under Cluster.
    scripts: &'static ChannelScripts,
}

fn split_hash(map: &HashMap<String, String>, field: &str) -> Option<String> {
    map.get(field).cloned()
}

fn num<T: std::str::FromStr + Default>(map: &HashMap<String, String>, field: &str) -> T {
    map.get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

/// A failed Redis call, classified and counted: the store's call boundary is where Redis
/// errors are handled.
fn failed(error: &redis::RedisError) -> StoreError {
    let error = StoreError::redis(error);
    if matches!(error, StoreError::Unavailable(_)) {
        STORE_ERRORS.inc();
    }
    error
}

fn timed_out() -> StoreError {
    STORE_ERRORS.inc();
    StoreError::Unavailable("redis call timed out".into())
}

impl RedisStore {
    /// Prepares the store and starts its pub/sub listener. Does not wait for Redis: a store
    /// created while Redis is down answers `Unavailable` until it is back.
    pub fn connect(
        options: &RedisOptions,
        settings: StoreSettings,
        hub: Arc<Hub>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let target = if let Some(cluster) = options.connect.cluster_client(options.timeout, None)? {
            Target::cluster(cluster, options.timeout)
        } else if let Some(sentinel) = options.connect.sentinel_client()? {
            Target::following(sentinel, config, options.timeout, tasks, shutdown.clone())
        } else {
            Target::fixed(options.connect.client()?, config).map_err(|e| StoreError::redis(&e))?
        };
        let cluster = target.is_cluster();
        let keys = if cluster {
            Keys::for_cluster(&options.key_prefix)
        } else {
            Keys::new(&options.key_prefix)
        };
        let (tx, rx) = mpsc::channel(RECONCILE_QUEUE);
        let listener = Listener {
            connect: options.connect.clone(),
            target: target.clone(),
            keys: keys.clone(),
            hub,
            membership_channel: options.membership_channel.clone(),
            timeout: options.timeout,
            requests: rx,
            shutdown,
        };
        tasks.spawn(listener.run());
        Ok(Self {
            target,
            keys,
            settings,
            timeout: options.timeout,
            audit_maxlen: options.audit_maxlen.to_string(),
            audit_policy: match options.audit_maxlen {
                0 => scripts::audit_policy(
                    true,
                    options.audit_backlog_max,
                    options.audit_denial_window_ms,
                ),
                cap => scripts::audit_policy(false, cap, options.audit_denial_window_ms),
            },
            listener: tx,
            wait_replicas: options.wait_replicas,
            nodes_swept_at: Arc::default(),
            scripts: ChannelScripts::get(cluster),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The Redis this store talks to (for the audit writer).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The shared connection to the current master; `Unavailable` while none is known.
    async fn conn(&self) -> Result<Conn, StoreError> {
        self.target.conn().await.map_err(|e| failed(&e))
    }

    /// Publishes `event` on the user's topic: sharded pub/sub under Cluster, in the slot of
    /// the user's keys.
    async fn publish_user(
        &self,
        conn: &mut Conn,
        uid: &UserId,
        event: &wire::WireUserEvent,
    ) -> Result<(), StoreError> {
        let payload =
            serde_json::to_string(event).map_err(|e| StoreError::Internal(e.to_string()))?;
        let command = if self.target.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let _: i64 = self
            .bounded(
                redis::cmd(command)
                    .arg(self.keys.topic_events(&Topic::User(uid.clone())))
                    .arg(payload)
                    .query_async(conn),
            )
            .await?;
        Ok(())
    }

    /// Runs `fut` within the store's time bound.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// `EVALSHA` of a channel script with the standard keys and arguments, plus `extra`.
    fn evalsha(&self, script: &Script, ch: &ChannelId, extra: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(9);
        for key in self.keys.channel(ch).all() {
            cmd.arg(key);
        }
        cmd.arg(ch.as_str())
            .arg(self.settings.lease_ms)
            .arg(self.settings.max_talk_ms)
            .arg(GC_GRACE_MS)
            .arg(&self.audit_policy);
        for arg in extra {
            cmd.arg(*arg);
        }
        cmd
    }

    /// Runs `pipe`, whose first command is `EVALSHA` of `script`; loads the script and retries
    /// once if Redis does not know it (after a restart or a `SCRIPT FLUSH`).
    async fn run_script_pipe<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn)).await {
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.bounded(script.prepare_invoke().load_async(&mut conn))
                    .await?;
                self.bounded(pipe.query_async::<T>(&mut conn)).await
            }
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Runs a channel script and returns its JSON answer.
    async fn channel_script(
        &self,
        script: &Script,
        ch: &ChannelId,
        extra: &[&str],
    ) -> Result<String, StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha(script, ch, extra));
        let (answer,): (String,) = self.run_script_pipe(script, &pipe).await?;
        Ok(answer)
    }

    /// Moves a session's deadline entry and its place among its user's sessions to `expires`
    /// (two slots under Cluster: two calls).
    async fn set_session_deadline(
        &self,
        sid: &SessionId,
        uid: &UserId,
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.bounded(conn.zadd::<_, _, _, ()>(
            self.keys.session_deadlines(sid),
            sid.as_str(),
            expires,
        ))
        .await?;
        self.bounded(
            redis::cmd("ZADD")
                .arg(self.keys.user_sessions(uid))
                .arg("XX")
                .arg(expires)
                .arg(sid.as_str())
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Keeps a sync session's entry in the deadline index in step with its state.
    async fn set_sync_deadline(
        &self,
        id: &SyncId,
        deadline: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let index = self.keys.sync_deadlines(id);
        match deadline {
            Some(at) => {
                self.bounded(conn.zadd::<_, _, _, ()>(index, id.as_str(), at))
                    .await
            }
            None => {
                self.bounded(conn.zrem::<_, _, ()>(index, id.as_str()))
                    .await
            }
        }
    }

    /// Makes sure the sweeper looks at this channel's floor no later than `at_ms`.
    async fn schedule_floor_check(&self, ch: &ChannelId, at_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.bounded(self.schedule_cmd(ch, at_ms).query_async::<()>(&mut conn))
            .await
    }

    /// `ZADD LT`: the index entry only ever moves earlier here; the sweeper moves it to the
    /// grant's real expiry when it looks.
    fn schedule_cmd(&self, ch: &ChannelId, at_ms: i64) -> redis::Cmd {
        redis::cmd("ZADD")
            .arg(self.keys.floor_deadlines(ch))
            .arg("LT")
            .arg(at_ms)
            .arg(ch.as_str())
            .to_owned()
    }

    async fn reschedule(
        &self,
        index: &str,
        member: &str,
        seen: &str,
        next: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let next = next.map(|n| n.to_string()).unwrap_or_default();
        let mut invocation = scripts::RESCHEDULE.prepare_invoke();
        invocation.key(index).arg(member).arg(seen).arg(next);
        self.bounded(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    async fn leave(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
        reason: &str,
    ) -> Result<LeaveOutcome, StoreError> {
        let raw = self
            .channel_script(&self.scripts.leave, ch, &[sid.as_str(), reason])
            .await?;
        let left: WireLeave = parse(&raw, "leave result")?;
        let mut sets = vec![self.keys.session_channels(sid)];
        if let Some(node) = left.node.as_deref().and_then(|n| NodeId::parse(n).ok()) {
            sets.push(self.keys.media_node_channels(&node));
        }
        if left.empty {
            sets.push(self.keys.channels_index(ch));
        }
        self.remove_from_sets(&sets, ch.as_str()).await?;
        Ok(LeaveOutcome {
            was_member: left.was_member,
            released_floor: left.released,
        })
    }

    /// Removes `member` from each of `sets` (in several slots under Cluster: a call each,
    /// concurrently; on one server, one pipeline).
    async fn remove_from_sets(&self, sets: &[String], member: &str) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        if self.target.is_cluster() {
            let calls = sets.iter().map(|set| {
                let mut conn = conn.clone();
                async move { self.bounded(conn.srem::<_, _, ()>(set, member)).await }
            });
            futures::future::try_join_all(calls).await.map(drop)
        } else {
            let mut pipe = redis::pipe();
            for set in sets {
                pipe.srem(set, member).ignore();
            }
            self.bounded(pipe.query_async::<()>(&mut conn.clone()))
                .await
        }
    }

    async fn read_session(&self, sid: &SessionId) -> Result<Option<Session>, StoreError> {
        let mut conn = self.conn().await?;
        let (hash, channels): (HashMap<String, String>, Vec<String>) = self
            .bounded(
                redis::pipe()
                    .hgetall(self.keys.session(sid))
                    .smembers(self.keys.session_channels(sid))
                    .query_async(&mut conn),
            )
            .await?;
        if hash.is_empty() {
            return Ok(None);
        }
        let corrupt = || StoreError::Internal("unreadable session in redis".into());
        let mut channels: Vec<ChannelId> = channels
            .iter()
            .filter_map(|c| ChannelId::parse(c).ok())
            .collect();
        channels.sort();
        Ok(Some(Session {
            session_id: sid.clone(),
            user_id: UserId::parse(
                &split_hash(&hash, fields::session::USER_ID).unwrap_or_default(),
            )
            .map_err(|_| corrupt())?,
            user_name: split_hash(&hash, fields::session::USER_NAME).unwrap_or_default(),
            gateway_id: split_hash(&hash, fields::session::GATEWAY).unwrap_or_default(),
            created_at_ms: num(&hash, fields::session::CREATED),
            expires_at_ms: num(&hash, fields::session::EXPIRES),
            ttl_ms: num(&hash, fields::session::TTL),
            channels,
            generation: num(&hash, fields::session::GENERATION),
            parked_at_ms: num(&hash, fields::session::PARKED),
        }))
    }

    fn node_from_hash(
        &self,
        id: NodeId,
        hash: &HashMap<String, String>,
        channels: u32,
        now: i64,
    ) -> MediaNode {
        let last: i64 = num(hash, fields::node::LAST_HEARTBEAT);
        MediaNode {
            node_id: id,
            grpc_addr: split_hash(hash, fields::node::ADDR).unwrap_or_default(),
            announced_ip: split_hash(hash, fields::node::IP).unwrap_or_default(),
            capacity: num(hash, fields::node::CAPACITY),
            load: num(hash, fields::node::LOAD),
            channels,
            draining: hash.get(fields::node::DRAINING).is_some_and(|d| d == "1"),
            last_heartbeat_ms: last,
            live: now - last <= i64::from(self.settings.node_dead_after_ms),
        }
    }

    async fn read_node(&self, id: &NodeId) -> Result<Option<MediaNode>, StoreError> {
        let mut conn = self.conn().await?;
        let (hash, channels): (HashMap<String, String>, u32) = self
            .bounded(
                redis::pipe()
                    .hgetall(self.keys.media_node(id))
                    .scard(self.keys.media_node_channels(id))
                    .query_async(&mut conn),
            )
            .await?;
        if hash.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.node_from_hash(
            id.clone(),
            &hash,
            channels,
            now_ms(),
        )))
    }

    /// Up to a sweep batch of `index`'s entries due at `now`: (member, score).
    async fn due(&self, index: &str, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn().await?;
        self.bounded(
            redis::cmd("ZRANGE")
                .arg(index)
                .arg("-inf")
                .arg(now)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .arg("WITHSCORES")
                .query_async(&mut conn),
        )
        .await
    }

    async fn sweep_floors(&self, now: i64) -> Result<u32, StoreError> {
        let mut expired = 0;
        for index in self.keys.floor_deadlines_all() {
            let due = self.due(&index, now).await?;
            for (member, score) in due {
                let Ok(ch) = ChannelId::parse(&member) else {
                    self.reschedule(&index, &member, &score, None).await?;
                    continue;
                };
                let raw = self.channel_script(&self.scripts.expire, &ch, &[]).await?;
                let result: WireExpire = parse(&raw, "expire result")?;
                expired += u32::from(result.expired);
                self.reschedule(&index, &member, &score, result.next)
                    .await?;
            }
        }
        Ok(expired)
    }

    /// Moves the channels of dead and draining nodes to the least loaded live node each, and
    /// tells the channels' watchers; how many moved. Replicas racing each other move each
    /// channel once (a compare-and-set on its placement).
    async fn sweep_nodes(&self) -> Result<u32, StoreError> {
        // Liveness changes at heartbeat granularity: the registry is read a few times per
        // heartbeat interval, not at every sweep of floors and sessions.
        let now = now_ms();
        let every = i64::from(self.settings.node_heartbeat_ms / 4);
        let last = self
            .nodes_swept_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last < every {
            return Ok(0);
        }
        self.nodes_swept_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let mut nodes = crate::store::RegistryStore::list_nodes(self).await?;
        for gone in nodes_to_forget(&nodes, now, self.settings.node_forget_after_ms) {
            tracing::info!(node_id = %gone, "dead media node forgotten");
            crate::store::RegistryStore::deregister_node(self, &gone).await?;
        }
        let mut moved = 0;
        let emptied: Vec<(MediaNode, MoveReason)> = nodes_to_empty(&nodes)
            .into_iter()
            .map(|(n, r)| (n.clone(), r))
            .collect();
        let mut conn = self.conn().await?;
        for (from, reason) in emptied {
            let channels: Vec<String> = self
                .bounded(conn.smembers(self.keys.media_node_channels(&from.node_id)))
                .await?;
            for raw in channels {
                let Ok(ch) = ChannelId::parse(&raw) else {
                    continue;
                };
                let Some(to) = choose_node(&nodes).cloned() else {
                    // Nowhere to go: the next join places the channel once a node is live.
                    return Ok(moved);
                };
                if self
                    .move_channel(&mut conn, &ch, &from, &to, reason)
                    .await?
                {
                    moved += 1;
                    // The next channel weighs the new one in.
                    if let Some(n) = nodes.iter_mut().find(|n| n.node_id == to.node_id) {
                        n.channels += 1;
                    }
                }
            }
        }
        Ok(moved)
    }

    /// Moves `ch` from `from` to `to` unless another replica moved it first, telling its
    /// watchers in the same step; true when this call moved it.
    async fn move_channel(
        &self,
        conn: &mut Conn,
        ch: &ChannelId,
        from: &MediaNode,
        to: &MediaNode,
        reason: MoveReason,
    ) -> Result<bool, StoreError> {
        let event = serde_json::json!({
            "k": "moved",
            "ch": ch.as_str(),
            "node": to.node_id.as_str(),
            "addr": to.grpc_addr,
            "from": from.node_id.as_str(),
            "reason": reason.as_str(),
            "at": now_ms(),
        });
        let keys = self.keys.channel(ch);
        let mut invocation = self.scripts.moved.prepare_invoke();
        invocation
            .key(&keys.media)
            .key(&keys.events)
            .arg(from.node_id.as_str())
            .arg(to.node_id.as_str())
            .arg(event.to_string());
        let done: i64 = self.bounded(invocation.invoke_async(conn)).await?;
        self.bounded(
            conn.srem::<_, _, ()>(self.keys.media_node_channels(&from.node_id), ch.as_str()),
        )
        .await?;
        if done != 1 {
            return Ok(false);
        }
        self.bounded(
            conn.sadd::<_, _, ()>(self.keys.media_node_channels(&to.node_id), ch.as_str()),
        )
        .await?;
        tracing::info!(
            channel_id = %ch,
            from = %from.node_id,
            to = %to.node_id,
            reason = reason.as_str(),
            "channel moved"
        );
        Ok(true)
    }

    async fn sweep_sessions(&self, now: i64) -> Result<u32, StoreError> {
        let mut expired = 0;
        for index in self.keys.session_deadlines_all() {
            expired += self.sweep_session_shard(&index, now).await?;
        }
        Ok(expired)
    }

    async fn sweep_session_shard(&self, index: &str, now: i64) -> Result<u32, StoreError> {
        let due = self.due(index, now).await?;
        let mut expired = 0;
        for (member, score) in due {
            let Ok(sid) = SessionId::parse(&member) else {
                self.reschedule(index, &member, &score, None).await?;
                continue;
            };
            match self.read_session(&sid).await? {
                Some(s) if rules::session_live(&s, now) => {
                    self.reschedule(index, &member, &score, Some(s.expires_at_ms))
                        .await?;
                }
                _ => {
                    tracing::info!(session_id = %sid, "session expired");
                    self.remove_session(&sid, None).await?;
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }
}

/// The floor refusal a script answered, or an internal error for any other answer.
fn refusal(verdict: Verdict) -> Result<FloorRefusal, StoreError> {
    verdict.refusal().ok_or_else(|| verdict.unexpected("floor"))
}

/// Converts an acquire script's answer (also the emergency take's).
fn acquire_outcome(raw: &str) -> Result<AcquireOutcome, StoreError> {
    let a: WireAcquire = parse(raw, "acquire result")?;
    let holder = a.holder.map(wire::WireHolder::into_domain).transpose()?;
    let result = match a.r {
        Verdict::NotMember => return Err(StoreError::NotMember),
        Verdict::Granted => Acquired::Granted {
            holder: holder.ok_or_else(|| missing("holder"))?,
            max_talk_ms: u32::try_from(a.max_talk.unwrap_or_default()).unwrap_or(u32::MAX),
            preempted: a
                .preempted
                .map(wire::WireSpeaker::into_domain)
                .transpose()?,
        },
        Verdict::Denied => Acquired::Denied {
            holder: holder.ok_or_else(|| missing("holder"))?,
            retry_after_ms: a.retry.unwrap_or_default(),
        },
        Verdict::Queued => Acquired::Queued {
            holder: holder.ok_or_else(|| missing("holder"))?,
            position: a.pos.unwrap_or_default(),
        },
        other => return Err(other.unexpected("acquire")),
    };
    Ok(AcquireOutcome {
        result,
        server_time_ms: a.now,
    })
}

fn release_outcome(raw: &str) -> Result<ReleaseOutcome, StoreError> {
    let r: WireRelease = parse(raw, "release result")?;
    Ok(ReleaseOutcome {
        refusal: match r.r {
            Verdict::Released => None,
            other => Some(refusal(other)?),
        },
        epoch: wire::epoch(&r.epoch)?,
        dequeued: r.dequeued,
    })
}

fn missing(what: &str) -> StoreError {
    StoreError::Internal(format!("script result without {what}"))
}

#[cfg(test)]
mod tests {
    use crate::connect::redact_url;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
