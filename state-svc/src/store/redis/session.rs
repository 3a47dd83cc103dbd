//! The Redis store: sessions, membership and the admin listings of them.

use super::*;
use crate::store::SessionStore;

impl SessionStore for RedisStore {
    async fn create_session(&self, new: NewSession) -> Result<Session, StoreError> {
        let now = now_ms();
        let new_digest = new.resume_digest.clone();
        let session = rules::new_session(new, now, self.settings.session_ttl_ms);
        let ttl = i64::from(session.ttl_ms);
        let key = self.keys.session(&session.session_id);
        let sid = session.session_id.as_str();
        let fields = [
            (
                fields::session::USER_ID,
                session.user_id.as_str().to_owned(),
            ),
            (fields::session::USER_NAME, session.user_name.clone()),
            (fields::session::GATEWAY, session.gateway_id.clone()),
            (fields::session::CREATED, now.to_string()),
            (fields::session::EXPIRES, session.expires_at_ms.to_string()),
            (fields::session::TTL, ttl.to_string()),
            (fields::session::RESUME_DIGEST, new_digest),
            (fields::session::GENERATION, "0".to_owned()),
        ];
        let mut conn = self.conn().await?;
        // The session's hash goes first, before its place among the user's sessions: a listing
        // of the user's sessions (which forgets places whose session is gone) runs during other
        // creates (a refused create looks for a parked session to end), and must never find a
        // claimed place whose session is not written yet. A create interrupted before its claim
        // leaves a hash nobody can name, gone with its time to live.
        let mut hash = redis::pipe();
        hash.hset_multiple(&key, &fields)
            .ignore()
            .pexpire(&key, ttl + SESSION_GRACE_MS)
            .ignore();
        self.bounded(hash.query_async::<()>(&mut conn)).await?;
        let places = self.keys.user_sessions(&session.user_id);
        let mut claim = scripts::CLAIM_SESSION.prepare_invoke();
        claim
            .key(&places)
            .arg(sid)
            .arg(self.settings.max_sessions_per_user)
            .arg(session.expires_at_ms)
            .arg(now);
        let refused = match self.bounded(claim.invoke_async::<i64>(&mut conn)).await {
            Ok(0) => Some(StoreError::TooManySessions),
            Ok(_) => None,
            Err(error) => Some(error),
        };
        if let Some(error) = refused {
            let _ = self.bounded(conn.del::<_, ()>(&key)).await;
            return Err(error);
        }
        // The deadline entry next: whatever happens after it, the sweeper finds the session
        // when it is due and removes what is left of it.
        let indexed = self
            .bounded(conn.zadd::<_, _, _, ()>(
                self.keys.session_deadlines(&session.session_id),
                sid,
                session.expires_at_ms,
            ))
            .await;
        if let Err(error) = indexed {
            // Give the user's place back; if this fails too, the place runs out with the
            // session's time to live.
            let _ = self.bounded(conn.zrem::<_, _, ()>(&places, sid)).await;
            let _ = self.bounded(conn.del::<_, ()>(&key)).await;
            return Err(error);
        }
        Ok(session)
    }

    async fn touch_session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        let now = now_ms();
        let mut session = self
            .read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))?;
        if !rules::session_live(&session, now) {
            return Err(StoreError::NotFound("session"));
        }
        let expires = rules::touched_until(&session, now);
        let mut conn = self.conn().await?;
        let mut invocation = scripts::TOUCH_SESSION.prepare_invoke();
        invocation
            .key(self.keys.session(sid))
            .key(self.keys.session_channels(sid))
            .arg(expires)
            .arg(expires - now + SESSION_GRACE_MS);
        let exists: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if exists == 0 {
            return Err(StoreError::NotFound("session"));
        }
        self.set_session_deadline(sid, &session.user_id, expires)
            .await?;
        session.expires_at_ms = expires;
        Ok(session)
    }

    async fn park_session(&self, sid: &SessionId, generation: u64) -> Result<Session, StoreError> {
        let now = now_ms();
        let expires = rules::parked_until(now, self.settings.resume_grace_ms);
        let mut conn = self.conn().await?;
        // The deadline moves earlier first, so the sweeper looks no later than the parked
        // session's end (if the park is refused, it finds the session live and looks again
        // at its real expiry).
        self.bounded(conn.zadd::<_, _, _, ()>(
            self.keys.session_deadlines(sid),
            sid.as_str(),
            expires,
        ))
        .await?;
        let mut invocation = scripts::PARK_SESSION.prepare_invoke();
        invocation
            .key(self.keys.session(sid))
            .key(self.keys.session_channels(sid))
            .arg(generation)
            .arg(expires)
            .arg(expires - now + SESSION_GRACE_MS)
            .arg(now);
        let parked: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if parked == 0 {
            return Err(StoreError::NotFound("session"));
        }
        let session = self.session(sid).await?;
        self.set_session_deadline(sid, &session.user_id, expires)
            .await?;
        Ok(session)
    }

    async fn resume_session(&self, resume: Resume) -> Result<Session, StoreError> {
        let now = now_ms();
        let sid = &resume.session_id;
        let mut conn = self.conn().await?;
        let mut invocation = scripts::RESUME_SESSION.prepare_invoke();
        invocation
            .key(self.keys.session(sid))
            .key(self.keys.session_channels(sid))
            .arg(resume.user_id.as_str())
            .arg(&resume.digest)
            .arg(&resume.next_digest)
            .arg(&resume.gateway_id)
            .arg(now)
            .arg(SESSION_GRACE_MS);
        let (generation, expires): (i64, i64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        match generation {
            0 => return Err(StoreError::NotFound("session")),
            g if g < 0 => return Err(StoreError::PermissionDenied("resume refused")),
            _ => {}
        }
        self.set_session_deadline(sid, &resume.user_id, expires)
            .await?;
        let resumed = wire::WireUserEvent::Resumed(wire::WireResumed {
            uid: resume.user_id.to_string(),
            sid: sid.to_string(),
            generation: u64::try_from(generation).unwrap_or_default(),
        });
        self.publish_user(&mut conn, &resume.user_id, &resumed)
            .await?;
        self.session(sid).await
    }

    async fn session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        self.read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))
    }

    async fn user_sessions(&self, uid: &UserId) -> Result<Vec<Session>, StoreError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = self
            .bounded(conn.zrange(self.keys.user_sessions(uid), 0, -1))
            .await?;
        let mut sessions = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(sid) = SessionId::parse(&id) else {
                continue;
            };
            match self.read_session(&sid).await? {
                Some(s) => sessions.push(s),
                None => {
                    let _: () = self
                        .bounded(conn.zrem(self.keys.user_sessions(uid), &id))
                        .await?;
                }
            }
        }
        sessions.sort_by_key(|s| s.created_at_ms);
        Ok(sessions)
    }

    async fn join_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> Result<ChannelState, StoreError> {
        let session = self
            .read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))?;
        let member = serde_json::to_string(&StoredMember {
            uid: session.user_id.as_str(),
            name: &session.user_name,
            at: now_ms(),
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let max_members = self.settings.max_members_per_channel.to_string();
        let raw = self
            .channel_script(
                &self.scripts.join,
                ch,
                &[sid.as_str(), &member, &max_members],
            )
            .await?;
        if raw == r#""full""# {
            return Err(StoreError::ChannelFull);
        }
        let state = parse::<WireState>(&raw, "channel state")?.into_domain(ch)?;
        let mut conn = self.conn().await?;
        let (_, exists): ((), bool) = self
            .bounded(
                redis::pipe()
                    .sadd(self.keys.session_channels(sid), ch.as_str())
                    .exists(self.keys.session(sid))
                    .query_async(&mut conn),
            )
            .await?;
        self.bounded(conn.sadd::<_, _, ()>(self.keys.channels_index(ch), ch.as_str()))
            .await?;
        if !exists {
            // The session was removed while joining: undo, so no member is left behind.
            self.leave(sid, ch, "disconnected").await?;
            return Err(StoreError::NotFound("session"));
        }
        Ok(state)
    }

    async fn leave_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> Result<LeaveOutcome, StoreError> {
        self.leave(sid, ch, "left_channel").await
    }

    async fn remove_session(
        &self,
        sid: &SessionId,
        generation: Option<u64>,
    ) -> Result<RemoveOutcome, StoreError> {
        // The session disappears first, so nobody sees it after its channels announce it left.
        // Its channel set and deadline entry go last: if this is interrupted, the sweeper finds
        // the entry, sees no session, and finishes the removal.
        let mut conn = self.conn().await?;
        let mut remove = scripts::REMOVE_SESSION.prepare_invoke();
        remove
            .key(self.keys.session(sid))
            .key(self.keys.session_channels(sid))
            .arg(generation.map_or_else(String::new, |g| g.to_string()));
        let answer: Vec<String> = self.bounded(remove.invoke_async(&mut conn)).await?;
        let (verdict, rest) = answer
            .split_first()
            .ok_or_else(|| StoreError::Internal("empty session removal answer".into()))?;
        let (uid, channels) = match Verdict::parse(verdict)? {
            Verdict::Ok => match rest.split_first() {
                Some((uid, channels)) => (Some(uid.clone()), channels.to_vec()),
                None => (None, Vec::new()),
            },
            Verdict::Moved => {
                return Err(StoreError::FailedPrecondition("session resumed elsewhere"));
            }
            other => return Err(other.unexpected("session removal")),
        };
        if let Some(uid) = uid.as_deref().and_then(|u| UserId::parse(u).ok()) {
            let _: () = self
                .bounded(conn.zrem(self.keys.user_sessions(&uid), sid.as_str()))
                .await?;
        }
        let mut outcome = RemoveOutcome::default();
        for raw in channels {
            let Ok(ch) = ChannelId::parse(&raw) else {
                continue;
            };
            let left = self.leave(sid, &ch, "disconnected").await?;
            if left.was_member {
                outcome.channels_left.push(ch);
            }
            outcome.floors_released += u32::from(left.released_floor);
        }
        self.bounded(conn.del::<_, ()>(self.keys.session_channels(sid)))
            .await?;
        self.bounded(conn.zrem::<_, _, ()>(self.keys.session_deadlines(sid), sid.as_str()))
            .await?;
        outcome.channels_left.sort();
        Ok(outcome)
    }

    async fn list_channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let mut conn = self.conn().await?;
        let mut channels = Vec::new();
        for shard in self.keys.channels_index_all() {
            let raw: Vec<String> = self.bounded(conn.smembers(shard)).await?;
            channels.extend(raw.iter().filter_map(|c| ChannelId::parse(c).ok()));
        }
        channels.sort();
        channels.dedup();
        Ok(channels)
    }

    async fn list_sessions(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        let mut conn = self.conn().await?;
        let last = isize::try_from(limit.max(1)).unwrap_or(isize::MAX) - 1;
        // The first `limit` by expiry of every shard, merged.
        let mut ids: Vec<(String, i64)> = Vec::new();
        for shard in self.keys.session_deadlines_all() {
            let some: Vec<(String, i64)> =
                self.bounded(conn.zrange_withscores(shard, 0, last)).await?;
            ids.extend(some);
        }
        ids.sort_by_key(|(_, at)| *at);
        ids.truncate(limit.max(1));
        let mut sessions = Vec::with_capacity(ids.len());
        for (id, _) in ids {
            if let Ok(sid) = SessionId::parse(&id)
                && let Some(session) = self.read_session(&sid).await?
            {
                sessions.push(session);
            }
        }
        Ok(sessions)
    }

    async fn kick_user(&self, uid: &UserId, reason: &str) -> Result<u32, StoreError> {
        let sessions = self.user_sessions(uid).await?;
        for session in &sessions {
            self.remove_session(&session.session_id, None).await?;
        }
        let kick = wire::WireUserEvent::Kick(wire::WireKick {
            uid: uid.to_string(),
            reason: reason.to_owned(),
        });
        let mut conn = self.conn().await?;
        self.publish_user(&mut conn, uid, &kick).await?;
        Ok(u32::try_from(sessions.len()).unwrap_or(u32::MAX))
    }
}
