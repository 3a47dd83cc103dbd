//! The in-memory store: sessions, membership and the admin listings of them.

use super::*;
use crate::store::SessionStore;

impl SessionStore for MemoryStore {
    async fn create_session(&self, new: NewSession) -> Result<Session, StoreError> {
        let now = self.now_ms();
        let digest = new.resume_digest.clone();
        let session = rules::new_session(new, now, self.settings.session_ttl_ms);
        let mut inner = self.lock();
        let live = inner
            .user_sessions
            .get(&session.user_id)
            .into_iter()
            .flatten()
            .filter_map(|sid| inner.sessions.get(sid))
            .filter(|s| rules::session_live(s, now))
            .count();
        if !rules::room_for_session(live, self.settings.max_sessions_per_user) {
            return Err(StoreError::TooManySessions);
        }
        inner
            .user_sessions
            .entry(session.user_id.clone())
            .or_default()
            .insert(session.session_id.clone());
        inner
            .resume_digests
            .insert(session.session_id.clone(), (digest, None));
        inner
            .sessions
            .insert(session.session_id.clone(), session.clone());
        Ok(session)
    }

    async fn park_session(&self, sid: &SessionId, generation: u64) -> Result<Session, StoreError> {
        let now = self.now_ms();
        let mut inner = self.lock();
        let session = inner
            .sessions
            .get_mut(sid)
            .filter(|s| rules::session_live(s, now) && s.generation == generation)
            .ok_or(not_found("session"))?;
        session.expires_at_ms = rules::parked_until(now, self.settings.resume_grace_ms);
        session.parked_at_ms = now;
        Ok(session.clone())
    }

    async fn resume_session(&self, resume: Resume) -> Result<Session, StoreError> {
        let now = self.now_ms();
        let mut inner = self.lock();
        let (current, previous) = inner
            .resume_digests
            .get(&resume.session_id)
            .cloned()
            .unwrap_or_default();
        let session = inner
            .sessions
            .get_mut(&resume.session_id)
            .filter(|s| rules::session_live(s, now))
            .ok_or(not_found("session"))?;
        if rules::may_resume(
            session,
            [current.as_str(), previous.as_deref().unwrap_or("")],
            &resume,
        )
        .is_err()
        {
            return Err(StoreError::PermissionDenied("resume refused"));
        }
        session.generation += 1;
        session.gateway_id = resume.gateway_id;
        session.parked_at_ms = 0;
        session.expires_at_ms = now + i64::from(session.ttl_ms);
        let session = session.clone();
        inner
            .resume_digests
            .insert(resume.session_id, (resume.next_digest, Some(resume.digest)));
        drop(inner);
        self.hub.publish(UserEvent::Resumed {
            user_id: session.user_id.clone(),
            session_id: session.session_id.clone(),
            generation: session.generation,
        });
        Ok(session)
    }

    async fn touch_session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        let now = self.now_ms();
        let mut inner = self.lock();
        let session = inner
            .sessions
            .get_mut(sid)
            .filter(|s| rules::session_live(s, now))
            .ok_or(not_found("session"))?;
        session.expires_at_ms = rules::touched_until(session, now);
        let session = session.clone();
        // The token before the last resume dies at the first touch after it.
        if let Some(digests) = inner.resume_digests.get_mut(sid) {
            digests.1 = None;
        }
        Ok(session)
    }

    async fn session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        self.lock()
            .sessions
            .get(sid)
            .cloned()
            .ok_or(not_found("session"))
    }

    async fn user_sessions(&self, uid: &UserId) -> Result<Vec<Session>, StoreError> {
        let inner = self.lock();
        let mut sessions: Vec<Session> = inner
            .user_sessions
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|sid| inner.sessions.get(sid).cloned())
            .collect();
        sessions.sort_by_key(|s| s.created_at_ms);
        Ok(sessions)
    }

    async fn join_channel(
        &self,
        sid: &SessionId,
        id: &ChannelId,
    ) -> Result<ChannelState, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let max_members = self.settings.max_members_per_channel as usize;
        if !inner.sessions.contains_key(sid) {
            return Err(not_found("session"));
        }
        if inner
            .channels
            .get(id)
            .is_some_and(|ch| !ch.members.contains_key(sid) && ch.members.len() >= max_members)
        {
            return Err(StoreError::ChannelFull);
        }
        let session = inner.sessions.get_mut(sid).ok_or(not_found("session"))?;
        if !session.channels.contains(id) {
            session.channels.push(id.clone());
        }
        let member = Member {
            session_id: sid.clone(),
            user_id: session.user_id.clone(),
            user_name: session.user_name.clone(),
            joined_at_ms: step.now,
        };
        let ch = inner.channels.entry(id.clone()).or_default();
        if !ch.members.contains_key(sid) {
            ch.members.insert(sid.clone(), member.clone());
            step.membership_event(ch, member, MembershipChange::Joined);
        }
        Ok(step.state(ch))
    }

    async fn leave_channel(
        &self,
        sid: &SessionId,
        id: &ChannelId,
    ) -> Result<LeaveOutcome, StoreError> {
        let mut inner = self.lock();
        Ok(self.leave_locked(&mut inner, sid, id, FloorReason::LeftChannel))
    }

    async fn remove_session(
        &self,
        sid: &SessionId,
        generation: Option<u64>,
    ) -> Result<RemoveOutcome, StoreError> {
        let mut inner = self.lock();
        if let (Some(wanted), Some(session)) = (generation, inner.sessions.get(sid))
            && session.generation != wanted
        {
            return Err(StoreError::FailedPrecondition("session resumed elsewhere"));
        }
        Ok(self.remove_locked(&mut inner, sid))
    }

    async fn list_channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let inner = self.lock();
        let mut channels: Vec<ChannelId> = inner
            .channels
            .iter()
            .filter(|(_, ch)| !ch.members.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        channels.sort();
        Ok(channels)
    }

    async fn list_sessions(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        let inner = self.lock();
        let mut sessions: Vec<Session> = inner.sessions.values().cloned().collect();
        sessions.sort_by_key(|s| s.expires_at_ms);
        sessions.truncate(limit);
        Ok(sessions)
    }

    async fn kick_user(&self, uid: &UserId, reason: &str) -> Result<u32, StoreError> {
        let mut inner = self.lock();
        let sids: Vec<SessionId> = inner
            .user_sessions
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for sid in &sids {
            self.remove_locked(&mut inner, sid);
        }
        drop(inner);
        self.hub.publish(UserEvent::Kicked {
            user_id: uid.clone(),
            reason: reason.to_owned(),
        });
        Ok(u32::try_from(sids.len()).unwrap_or(u32::MAX))
    }
}
