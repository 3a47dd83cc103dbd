//! The Redis store: floors and channel configuration.

use super::*;
use crate::store::FloorStore;

impl FloorStore for RedisStore {
    async fn acquire_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        priority: u32,
        min_epoch: u64,
    ) -> Result<AcquireOutcome, StoreError> {
        let priority_arg = priority.to_string();
        let min_epoch_arg = min_epoch.to_string();
        // The acquire and the sweeper's index entry go in one round trip. The entry is an
        // estimate (now + the default lease); a grant that ends sooner is rescheduled below.
        let estimate = now_ms() + i64::from(self.settings.lease_ms);
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha(
            &self.scripts.acquire,
            ch,
            &[sid.as_str(), &priority_arg, &min_epoch_arg],
        ));
        // On one server the sweeper's entry rides in the same round trip; under Cluster it
        // lives in another slot and goes beside it.
        let cluster = self.target.is_cluster();
        if !cluster {
            pipe.add_command(self.schedule_cmd(ch, estimate)).ignore();
        }
        // With replicas to wait for, the grant is answered only once they hold it: a failover
        // right after cannot lose a floor someone was told they have.
        let wait_ms = (self.timeout / 2).as_millis().max(1);
        if self.wait_replicas > 0 {
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(wait_ms as u64);
        }
        let acquire = async {
            if self.wait_replicas > 0 {
                let (raw, acked): (String, i64) =
                    self.run_script_pipe(&self.scripts.acquire, &pipe).await?;
                Ok::<_, StoreError>((raw, Some(acked)))
            } else {
                let (raw,): (String,) = self.run_script_pipe(&self.scripts.acquire, &pipe).await?;
                Ok((raw, None))
            }
        };
        let (raw, acked): (String, Option<i64>) = if cluster {
            let (answer, ()) =
                futures::future::try_join(acquire, self.schedule_floor_check(ch, estimate)).await?;
            answer
        } else {
            acquire.await?
        };
        let outcome = acquire_outcome(&raw)?;
        if let (Acquired::Granted { holder, .. }, Some(acked)) = (&outcome.result, acked)
            && acked < i64::from(self.wait_replicas)
        {
            tracing::warn!(channel_id = %ch, acked, wanted = self.wait_replicas, "grant not replicated in time; given back");
            STORE_ERRORS.inc();
            let _ = self.release_floor(ch, sid, Some(holder.epoch)).await;
            return Err(StoreError::Unavailable("grant not replicated".into()));
        }
        if let Acquired::Granted { holder, .. } = &outcome.result
            && holder.expires_at_ms < estimate
        {
            self.schedule_floor_check(ch, holder.expires_at_ms).await?;
        }
        Ok(outcome)
    }

    async fn renew_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: u64,
    ) -> Result<RenewOutcome, StoreError> {
        let epoch_arg = epoch.to_string();
        let raw = self
            .channel_script(&self.scripts.renew, ch, &[sid.as_str(), &epoch_arg])
            .await?;
        let r: WireRenew = parse(&raw, "renew result")?;
        let result = match r.r {
            Verdict::Renewed => Ok(Renewed {
                expires_at_ms: r.expires.ok_or_else(|| missing("expiry"))?,
                max_until_ms: r.max_until.ok_or_else(|| missing("max talk time"))?,
            }),
            other => Err(refusal(other)?),
        };
        Ok(RenewOutcome {
            result,
            server_time_ms: r.now,
        })
    }

    async fn release_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let epoch_arg = epoch.unwrap_or(0).to_string();
        let raw = self
            .channel_script(&self.scripts.release, ch, &[sid.as_str(), &epoch_arg])
            .await?;
        release_outcome(&raw)
    }

    async fn force_release_floor(
        &self,
        ch: &ChannelId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let epoch_arg = epoch.unwrap_or(0).to_string();
        let raw = self
            .channel_script(&self.scripts.force_release, ch, &[&epoch_arg])
            .await?;
        // A force release never dequeues anyone.
        Ok(ReleaseOutcome {
            dequeued: false,
            ..release_outcome(&raw)?
        })
    }

    async fn channel_state(&self, ch: &ChannelId) -> Result<ChannelState, StoreError> {
        let raw = self.channel_script(&self.scripts.state, ch, &[]).await?;
        parse::<WireState>(&raw, "channel state")?.into_domain(ch)
    }

    async fn channel_config(&self, ch: &ChannelId) -> Result<ChannelConfig, StoreError> {
        let mut conn = self.conn().await?;
        let hash: HashMap<String, String> = self
            .bounded(conn.hgetall(self.keys.channel(ch).config))
            .await?;
        Ok(ChannelConfig {
            queue_enabled: hash.get(fields::config::QUEUE).is_some_and(|q| q == "1"),
            lease_ms: num(&hash, fields::config::LEASE_MS),
            max_talk_ms: num(&hash, fields::config::MAX_TALK_MS),
        })
    }

    async fn set_channel_config(
        &self,
        ch: &ChannelId,
        config: ChannelConfig,
    ) -> Result<ChannelConfig, StoreError> {
        let config = config.validate()?;
        let mut conn = self.conn().await?;
        let fields = [
            (
                fields::config::QUEUE,
                if config.queue_enabled {
                    "1".to_owned()
                } else {
                    "0".to_owned()
                },
            ),
            (fields::config::LEASE_MS, config.lease_ms.to_string()),
            (fields::config::MAX_TALK_MS, config.max_talk_ms.to_string()),
        ];
        self.bounded(conn.hset_multiple::<_, _, _, ()>(self.keys.channel(ch).config, &fields))
            .await?;
        Ok(config)
    }
}
