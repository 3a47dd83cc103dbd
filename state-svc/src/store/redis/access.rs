//! The Redis store: grants, events and emergency broadcasts.

use super::*;
use crate::store::AccessStore;

impl AccessStore for RedisStore {
    async fn user_grants(&self, uid: &UserId) -> Result<UserGrants, StoreError> {
        let mut conn = self.conn().await?;
        let hash: HashMap<String, String> =
            self.bounded(conn.hgetall(self.keys.grants(uid))).await?;
        let version = num(&hash, fields::grants::VERSION);
        let g = hash
            .into_iter()
            .filter(|(k, _)| k != fields::grants::VERSION)
            .collect();
        WireGrants {
            r: None,
            uid: None,
            v: version,
            g,
        }
        .into_domain(uid)
    }

    async fn update_grants(
        &self,
        uid: &UserId,
        change: &GrantChange,
    ) -> Result<GrantsUpdate, StoreError> {
        let mut invocation = self.scripts.update_grants.prepare_invoke();
        invocation
            .key(self.keys.grants(uid))
            .key(self.keys.topic_events(&Topic::User(uid.clone())))
            .arg("")
            .arg(uid.as_str())
            .arg(
                change
                    .expect_version
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            )
            .arg(if change.replace { "1" } else { "0" })
            .arg(MAX_GRANTS_PER_USER);
        for (ch, role) in &change.set {
            invocation
                .arg(ch.as_str())
                .arg(role.map(Role::as_str).unwrap_or_default());
        }
        let mut conn = self.conn().await?;
        let raw: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let answer: WireGrants = parse(&raw, "grants result")?;
        let verdict = answer.r.ok_or_else(|| missing("grants answer"))?;
        let grants = answer.into_domain(uid)?;
        if verdict == Verdict::Changed && self.wait_replicas > 0 {
            // A stored change a failover could lose is reported as not done: the caller
            // retries, and the same change again is answered `unchanged` if it had landed.
            let wait_ms = (self.timeout / 2).as_millis().max(1) as u64;
            let acked: i64 = self
                .bounded(
                    redis::cmd("WAIT")
                        .arg(self.wait_replicas)
                        .arg(wait_ms)
                        .query_async(&mut conn),
                )
                .await?;
            if acked < i64::from(self.wait_replicas) {
                tracing::warn!(user_id = %uid, acked, wanted = self.wait_replicas, "grant change not replicated in time");
                return Err(StoreError::Unavailable(
                    "grant change not replicated".into(),
                ));
            }
        }
        match verdict {
            Verdict::Changed => Ok(GrantsUpdate::Changed(grants)),
            Verdict::Unchanged => Ok(GrantsUpdate::Unchanged(grants)),
            Verdict::Mismatch => Ok(GrantsUpdate::VersionMismatch(grants)),
            Verdict::TooMany => Err(StoreError::InvalidArgument("too many grants")),
            other => Err(other.unexpected("grants")),
        }
    }

    async fn set_event_channels(
        &self,
        eid: &EventId,
        channels: &[ChannelId],
    ) -> Result<EventInfo, StoreError> {
        let channels = event_channel_list(channels)?;
        let joined = channels
            .iter()
            .map(ChannelId::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let keys = self.keys.events();
        let mut invocation = scripts::SET_EVENT.prepare_invoke();
        invocation
            .key(&keys.channels)
            .key(&keys.channel_event)
            .key(&keys.emergency)
            .arg(eid.as_str())
            .arg(joined);
        let mut conn = self.conn().await?;
        let answer: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        match Verdict::parse(&answer)? {
            Verdict::Busy => return Err(StoreError::EmergencyActive),
            Verdict::Ok => {}
            other => return Err(other.unexpected("event")),
        }
        Ok(EventInfo {
            event_id: eid.clone(),
            channels,
            emergency: None,
        })
    }

    async fn event(&self, eid: &EventId) -> Result<Option<EventInfo>, StoreError> {
        let keys = self.keys.events();
        let mut conn = self.conn().await?;
        let (channels, emergency): (Option<String>, Option<String>) = self
            .bounded(
                redis::pipe()
                    .hget(&keys.channels, eid.as_str())
                    .hget(&keys.emergency, eid.as_str())
                    .query_async(&mut conn),
            )
            .await?;
        let Some(channels) = channels else {
            return Ok(None);
        };
        Ok(Some(EventInfo {
            event_id: eid.clone(),
            channels: wire::channel_list(&channels)?,
            emergency: emergency
                .map(|raw| parse::<WireEmergency>(&raw, "emergency")?.into_domain())
                .transpose()?,
        }))
    }

    async fn channel_event(&self, ch: &ChannelId) -> Result<Option<EventId>, StoreError> {
        let mut conn = self.conn().await?;
        let eid: Option<String> = self
            .bounded(conn.hget(self.keys.events().channel_event, ch.as_str()))
            .await?;
        eid.map(|e| EventId::parse(&e).map_err(|_| missing("event id")))
            .transpose()
    }

    async fn claim_emergency(
        &self,
        eid: &EventId,
        by: &Speaker,
        force: bool,
    ) -> Result<Result<EventInfo, EmergencyHolder>, StoreError> {
        let keys = self.keys.events();
        let record = serde_json::to_string(&WireEmergency::from_speaker(by))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut invocation = scripts::CLAIM_EMERGENCY.prepare_invoke();
        invocation
            .key(&keys.channels)
            .key(&keys.emergency)
            .arg(eid.as_str())
            .arg(by.session_id.as_str())
            .arg(by.priority)
            .arg(record)
            .arg(if force { "1" } else { "0" });
        let mut conn = self.conn().await?;
        let raw: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let claim: WireClaim = parse(&raw, "emergency claim")?;
        let holder = claim.em.map(WireEmergency::into_domain).transpose()?;
        match claim.r {
            Verdict::NoEvent => Err(StoreError::NotFound("event")),
            Verdict::Busy => Ok(Err(holder.ok_or_else(|| missing("emergency"))?)),
            Verdict::Ok => Ok(Ok(EventInfo {
                event_id: eid.clone(),
                channels: wire::channel_list(claim.chans.as_deref().unwrap_or_default())?,
                emergency: holder,
            })),
            other => Err(other.unexpected("emergency claim")),
        }
    }

    async fn clear_emergency(
        &self,
        eid: &EventId,
        sid: Option<&SessionId>,
    ) -> Result<Option<EmergencyHolder>, StoreError> {
        let mut invocation = scripts::CLEAR_EMERGENCY.prepare_invoke();
        invocation
            .key(self.keys.events().emergency)
            .arg(eid.as_str())
            .arg(sid.map(SessionId::as_str).unwrap_or_default());
        let mut conn = self.conn().await?;
        let raw: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        raw.map(|r| parse::<WireEmergency>(&r, "emergency")?.into_domain())
            .transpose()
    }

    async fn emergency_take(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        eid: &EventId,
        priority: u32,
    ) -> Result<AcquireOutcome, StoreError> {
        let priority_arg = priority.to_string();
        let max_arg = self.settings.emergency_max_ms.to_string();
        let raw = self
            .channel_script(
                &self.scripts.emergency_take,
                ch,
                &[sid.as_str(), &priority_arg, eid.as_str(), &max_arg],
            )
            .await?;
        let outcome = acquire_outcome(&raw)?;
        if let Acquired::Granted { holder, .. } = &outcome.result {
            self.schedule_floor_check(ch, holder.expires_at_ms).await?;
        }
        Ok(outcome)
    }

    async fn emergency_release(
        &self,
        ch: &ChannelId,
        sid: Option<&SessionId>,
        eid: &EventId,
    ) -> Result<ReleaseOutcome, StoreError> {
        let raw = self
            .channel_script(
                &self.scripts.emergency_release,
                ch,
                &[sid.map(SessionId::as_str).unwrap_or_default(), eid.as_str()],
            )
            .await?;
        release_outcome(&raw)
    }
}
