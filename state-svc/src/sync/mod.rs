//! Sync sessions: versioned, synchronised multi-participant timers (briefing rounds, cue
//! countdowns, debate clocks) bound to a channel.
//!
//! Time is computed, never counted: a running clock is a start instant plus what was used
//! before, so every replica and client computes the same remaining time from the state and a
//! clock (`serverTime` is sent with every state). The transitions here are pure functions of
//! the state and `now`, unit-tested on an injected clock; the store makes each one an atomic
//! compare-and-set on `version`, and a deadline scheduler ([`scheduler`]) expires running
//! clocks when their time runs out, whether or not anyone calls. This module is the pure
//! model; only the scheduler uses the store.

mod scheduler;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::domain::{ChannelId, SyncId, UserId};
use crate::error::StoreError;

pub use scheduler::run_scheduler;

/// Participants a session may have.
pub const MAX_PARTICIPANTS: usize = 1_000;
/// Longest clock: one day.
pub const MAX_TIME_MS: i64 = 86_400_000;
/// A session lives this long after its last change, unless running.
pub const TTL_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Each participant has a bank; the active one's runs down; an optional Fischer increment
    /// is added to a bank at each switch.
    PerParticipant,
    /// Every cycle (turn) has `time_per_cycle_ms`; a switch starts a fresh cycle.
    PerCycle,
    /// Participants share their group's bank.
    PerGroup,
    /// One bank for the whole session, whoever is active.
    Global,
    /// Counts up from zero, to `max_time_ms` when set.
    CountUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Pending,
    Running,
    Paused,
    Expired,
    Completed,
    Cancelled,
}

impl SyncStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Expired | Self::Completed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub participant_id: String,
    pub group_id: Option<String>,
    /// This participant's bank (per-participant mode), increments included.
    pub total_time_ms: i64,
    /// Time used in finished stretches (not counting a running one).
    pub time_used_ms: i64,
    pub cycle_count: u32,
    pub is_active: bool,
    pub has_expired: bool,
}

/// A sync session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSession {
    pub session_id: SyncId,
    pub channel_id: Option<String>,
    /// The user who created it (for the per-user cap); absent on sessions stored before.
    #[serde(default)]
    pub owner: Option<String>,
    pub version: u64,
    pub sync_mode: SyncMode,
    pub status: SyncStatus,
    pub participants: Vec<Participant>,
    pub active_participant_id: Option<String>,
    pub total_time_ms: i64,
    pub time_per_cycle_ms: i64,
    pub increment_ms: i64,
    pub max_time_ms: i64,
    /// When the running stretch began; `None` unless running.
    pub cycle_started_at: Option<i64>,
    /// Time used in the current cycle before the last pause (per-cycle mode).
    pub cycle_used_ms: i64,
    pub session_started_at: Option<i64>,
    pub session_completed_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a client asks to create.
#[derive(Debug, Clone)]
pub struct NewSync {
    pub session_id: SyncId,
    pub channel_id: Option<ChannelId>,
    /// Who creates it.
    pub owner: Option<UserId>,
    pub sync_mode: SyncMode,
    pub participants: Vec<(String, Option<String>)>,
    pub total_time_ms: i64,
    pub time_per_cycle_ms: i64,
    pub increment_ms: i64,
    pub max_time_ms: i64,
}

/// A mutation of a sync session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    Start,
    /// To the named participant, or the next in order.
    Switch(Option<String>),
    Pause,
    Resume,
    Complete,
    Cancel,
    /// Replace the time settings (pending or paused only).
    Update {
        total_time_ms: i64,
        time_per_cycle_ms: i64,
        increment_ms: i64,
        max_time_ms: i64,
    },
    /// The scheduler found the time run out.
    Expire,
}

impl SyncAction {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Switch(_) => "switch",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Complete => "complete",
            Self::Cancel => "cancel",
            Self::Update { .. } => "update",
            Self::Expire => "expire",
        }
    }
}

fn valid_id(raw: &str) -> bool {
    talkgroup_proto::id::valid(raw)
}

fn bad(what: &'static str) -> StoreError {
    StoreError::InvalidArgument(what)
}

fn check_times(
    mode: SyncMode,
    total: i64,
    per_cycle: i64,
    increment: i64,
    max: i64,
) -> Result<(), StoreError> {
    let within = |v: i64, lo: i64| (lo..=MAX_TIME_MS).contains(&v);
    match mode {
        SyncMode::PerParticipant | SyncMode::PerGroup | SyncMode::Global
            if !within(total, 1_000) =>
        {
            Err(bad("total_time_ms must be 1 s to 24 h"))
        }
        SyncMode::PerCycle if !within(per_cycle, 100) => {
            Err(bad("time_per_cycle_ms must be 100 ms to 24 h"))
        }
        _ if !(0..=3_600_000).contains(&increment) => Err(bad("increment_ms must be 0 to 1 h")),
        _ if !(0..=MAX_TIME_MS).contains(&max) => Err(bad("max_time_ms must be 0 to 24 h")),
        _ => Ok(()),
    }
}

impl SyncSession {
    /// Validates a creation request into a pending session at version 1.
    pub fn create(new: NewSync, now: i64) -> Result<Self, StoreError> {
        if new.participants.is_empty() || new.participants.len() > MAX_PARTICIPANTS {
            return Err(bad("a sync session needs 1 to 1000 participants"));
        }
        let mut seen = HashSet::new();
        for (id, group) in &new.participants {
            if !valid_id(id) || group.as_deref().is_some_and(|g| !valid_id(g)) {
                return Err(bad("invalid participant or group id"));
            }
            if !seen.insert(id.as_str()) {
                return Err(bad("participant ids must be unique"));
            }
            if new.sync_mode == SyncMode::PerGroup && group.is_none() {
                return Err(bad("per_group needs a group for every participant"));
            }
        }
        check_times(
            new.sync_mode,
            new.total_time_ms,
            new.time_per_cycle_ms,
            new.increment_ms,
            new.max_time_ms,
        )?;
        Ok(Self {
            session_id: new.session_id,
            channel_id: new.channel_id.map(|c| c.to_string()),
            owner: new.owner.map(|u| u.to_string()),
            version: 1,
            sync_mode: new.sync_mode,
            status: SyncStatus::Pending,
            participants: new
                .participants
                .into_iter()
                .map(|(participant_id, group_id)| Participant {
                    participant_id,
                    group_id,
                    total_time_ms: new.total_time_ms,
                    time_used_ms: 0,
                    cycle_count: 0,
                    is_active: false,
                    has_expired: false,
                })
                .collect(),
            active_participant_id: None,
            total_time_ms: new.total_time_ms,
            time_per_cycle_ms: new.time_per_cycle_ms,
            increment_ms: new.increment_ms,
            max_time_ms: new.max_time_ms,
            cycle_started_at: None,
            cycle_used_ms: 0,
            session_started_at: None,
            session_completed_at: None,
            created_at: now,
            updated_at: now,
        })
    }

    fn active_index(&self) -> Option<usize> {
        let id = self.active_participant_id.as_ref()?;
        self.participants
            .iter()
            .position(|p| &p.participant_id == id)
    }

    /// Time of the running stretch at `now`.
    fn running_ms(&self, now: i64) -> i64 {
        self.cycle_started_at.map_or(0, |t| (now - t).max(0))
    }

    /// Remaining time of the clock that runs down (or up to its maximum), at `now`; `None`
    /// when nothing bounds it (count-up without a maximum).
    pub fn remaining_ms(&self, now: i64) -> Option<i64> {
        let running = self.running_ms(now);
        let used_all: i64 = self.participants.iter().map(|p| p.time_used_ms).sum();
        match self.sync_mode {
            SyncMode::PerParticipant => {
                let p = &self.participants[self.active_index().unwrap_or(0)];
                Some(p.total_time_ms - p.time_used_ms - running)
            }
            SyncMode::PerCycle => Some(self.time_per_cycle_ms - self.cycle_used_ms - running),
            SyncMode::PerGroup => {
                let p = &self.participants[self.active_index().unwrap_or(0)];
                let group_used: i64 = self
                    .participants
                    .iter()
                    .filter(|q| q.group_id == p.group_id)
                    .map(|q| q.time_used_ms)
                    .sum();
                Some(self.total_time_ms - group_used - running)
            }
            SyncMode::Global => Some(self.total_time_ms - used_all - running),
            SyncMode::CountUp => {
                (self.max_time_ms > 0).then(|| self.max_time_ms - used_all - running)
            }
        }
    }

    /// Each participant's remaining time at `now`, for replies.
    pub fn participant_remaining_ms(&self, now: i64) -> Vec<i64> {
        let running = self.running_ms(now);
        let active = self.active_index();
        let used_all: i64 = self.participants.iter().map(|p| p.time_used_ms).sum();
        self.participants
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mine = if Some(i) == active { running } else { 0 };
                match self.sync_mode {
                    SyncMode::PerParticipant => p.total_time_ms - p.time_used_ms - mine,
                    SyncMode::PerCycle => {
                        if Some(i) == active {
                            self.time_per_cycle_ms - self.cycle_used_ms - running
                        } else {
                            self.time_per_cycle_ms
                        }
                    }
                    SyncMode::PerGroup => {
                        let group_used: i64 = self
                            .participants
                            .iter()
                            .filter(|q| q.group_id == p.group_id)
                            .map(|q| q.time_used_ms)
                            .sum();
                        let group_running = active
                            .filter(|&a| self.participants[a].group_id == p.group_id)
                            .map_or(0, |_| running);
                        self.total_time_ms - group_used - group_running
                    }
                    SyncMode::Global => self.total_time_ms - used_all - running,
                    SyncMode::CountUp => {
                        if self.max_time_ms > 0 {
                            self.max_time_ms - used_all - running
                        } else {
                            used_all + running
                        }
                    }
                }
                .max(
                    if self.sync_mode == SyncMode::CountUp && self.max_time_ms == 0 {
                        i64::MIN
                    } else {
                        0
                    },
                )
            })
            .collect()
    }

    /// When the running clock runs out, if it runs and is bounded.
    pub fn deadline(&self) -> Option<i64> {
        let started = self.cycle_started_at?;
        if self.status != SyncStatus::Running {
            return None;
        }
        self.remaining_ms(started).map(|r| started + r)
    }

    /// Folds the running stretch into the active participant's used time.
    fn settle(&mut self, now: i64) {
        let running = self.running_ms(now);
        if let Some(i) = self.active_index() {
            self.participants[i].time_used_ms += running;
        }
        self.cycle_used_ms += running;
        self.cycle_started_at = None;
    }

    fn set_active(&mut self, index: usize) {
        for (i, p) in self.participants.iter_mut().enumerate() {
            p.is_active = i == index;
        }
        self.active_participant_id = Some(self.participants[index].participant_id.clone());
    }

    /// Applies `action` at `now`: the next state (version moved on), or why not.
    pub fn apply(&self, action: &SyncAction, now: i64) -> Result<Self, StoreError> {
        // A clock that ran out expires first, whatever was asked.
        if self.status == SyncStatus::Running
            && self.remaining_ms(now).is_some_and(|r| r <= 0)
            && *action != SyncAction::Expire
        {
            return Err(refused("the sync session has expired"));
        }
        let mut next = self.clone();
        match action {
            SyncAction::Start => next.start(now)?,
            SyncAction::Switch(to) => next.switch(to.as_deref(), now)?,
            SyncAction::Pause => next.pause(now)?,
            SyncAction::Resume => next.resume(now)?,
            SyncAction::Complete => next.complete(now)?,
            SyncAction::Cancel => next.cancel(now)?,
            SyncAction::Update {
                total_time_ms,
                time_per_cycle_ms,
                increment_ms,
                max_time_ms,
            } => next.update(
                *total_time_ms,
                *time_per_cycle_ms,
                *increment_ms,
                *max_time_ms,
            )?,
            SyncAction::Expire => next.expire(now)?,
        }
        next.version = self.version + 1;
        next.updated_at = now;
        Ok(next)
    }

    fn start(&mut self, now: i64) -> Result<(), StoreError> {
        if self.status != SyncStatus::Pending {
            return Err(refused("only a pending session can start"));
        }
        self.status = SyncStatus::Running;
        self.set_active(0);
        self.participants[0].cycle_count = 1;
        self.cycle_started_at = Some(now);
        self.session_started_at = Some(now);
        Ok(())
    }

    /// Hands the clock to `to` (the next in order when `None`); the one handing over earns
    /// the increment (per-participant mode).
    fn switch(&mut self, to: Option<&str>, now: i64) -> Result<(), StoreError> {
        if self.status != SyncStatus::Running {
            return Err(refused("only a running session can switch"));
        }
        let current = self.active_index().unwrap_or(0);
        let target = match to {
            Some(id) => self
                .participants
                .iter()
                .position(|p| p.participant_id == id)
                .ok_or(StoreError::NotFound("participant"))?,
            None => (current + 1) % self.participants.len(),
        };
        self.settle(now);
        if self.sync_mode == SyncMode::PerParticipant {
            self.participants[current].total_time_ms += self.increment_ms;
        }
        self.cycle_used_ms = 0;
        self.set_active(target);
        self.participants[target].cycle_count += 1;
        self.cycle_started_at = Some(now);
        Ok(())
    }

    fn pause(&mut self, now: i64) -> Result<(), StoreError> {
        if self.status != SyncStatus::Running {
            return Err(refused("only a running session can pause"));
        }
        self.settle(now);
        self.status = SyncStatus::Paused;
        Ok(())
    }

    fn resume(&mut self, now: i64) -> Result<(), StoreError> {
        if self.status != SyncStatus::Paused {
            return Err(refused("only a paused session can resume"));
        }
        self.status = SyncStatus::Running;
        self.cycle_started_at = Some(now);
        Ok(())
    }

    fn complete(&mut self, now: i64) -> Result<(), StoreError> {
        if !matches!(self.status, SyncStatus::Running | SyncStatus::Paused) {
            return Err(refused("only a running or paused session can complete"));
        }
        self.settle(now);
        self.status = SyncStatus::Completed;
        self.session_completed_at = Some(now);
        Ok(())
    }

    fn cancel(&mut self, now: i64) -> Result<(), StoreError> {
        if self.status.is_terminal() {
            return Err(refused("the session has already ended"));
        }
        self.settle(now);
        self.status = SyncStatus::Cancelled;
        self.session_completed_at = Some(now);
        Ok(())
    }

    /// New times; a pending session's participants get the new bank too.
    fn update(
        &mut self,
        total_time_ms: i64,
        time_per_cycle_ms: i64,
        increment_ms: i64,
        max_time_ms: i64,
    ) -> Result<(), StoreError> {
        if !matches!(self.status, SyncStatus::Pending | SyncStatus::Paused) {
            return Err(refused("only a pending or paused session can be updated"));
        }
        check_times(
            self.sync_mode,
            total_time_ms,
            time_per_cycle_ms,
            increment_ms,
            max_time_ms,
        )?;
        if self.status == SyncStatus::Pending {
            for p in &mut self.participants {
                p.total_time_ms = total_time_ms;
            }
        }
        self.total_time_ms = total_time_ms;
        self.time_per_cycle_ms = time_per_cycle_ms;
        self.increment_ms = increment_ms;
        self.max_time_ms = max_time_ms;
        Ok(())
    }

    fn expire(&mut self, now: i64) -> Result<(), StoreError> {
        let Some(deadline) = self.deadline().filter(|d| *d <= now) else {
            return Err(refused("the session has not run out"));
        };
        // Everything up to the deadline was used; not a millisecond more.
        self.settle(deadline);
        self.status = SyncStatus::Expired;
        self.session_completed_at = Some(deadline);
        if let Some(i) = self.active_index() {
            self.participants[i].has_expired = true;
        }
        Ok(())
    }

    /// How long the stored session lives after this change: none while running, an hour
    /// otherwise.
    /// What an audit entry keeps of the change from `before` to this: the top-level fields
    /// that changed, the participants that changed (whole), and always the version and the
    /// status, which the history reads. A change of the participant list keeps all of them.
    pub fn audit_change(&self, before: &SyncSession) -> serde_json::Value {
        let (Ok(serde_json::Value::Object(was)), Ok(serde_json::Value::Object(now))) =
            (serde_json::to_value(before), serde_json::to_value(self))
        else {
            return serde_json::to_value(self).unwrap_or_default();
        };
        let mut change: serde_json::Map<String, serde_json::Value> = now
            .iter()
            .filter(|(k, v)| {
                matches!(k.as_str(), "version" | "status")
                    || (*k != "participants" && was.get(*k) != Some(*v))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (was_list, now_list) = (&was["participants"], &now["participants"]);
        let participants: Vec<serde_json::Value> = match (was_list.as_array(), now_list.as_array())
        {
            (Some(a), Some(b)) if a.len() == b.len() => b
                .iter()
                .zip(a)
                .filter(|(new, old)| new != old)
                .map(|(new, _)| new.clone())
                .collect(),
            _ => now_list.as_array().cloned().unwrap_or_default(),
        };
        if !participants.is_empty() {
            change.insert("participants".into(), participants.into());
        }
        serde_json::Value::Object(change)
    }

    /// Whether the session can still change (pending, running or paused).
    pub fn open(&self) -> bool {
        matches!(
            self.status,
            SyncStatus::Pending | SyncStatus::Running | SyncStatus::Paused
        )
    }

    pub fn ttl_ms(&self) -> Option<i64> {
        (self.status != SyncStatus::Running).then_some(TTL_MS)
    }
}

fn refused(what: &'static str) -> StoreError {
    StoreError::FailedPrecondition(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(mode: SyncMode, groups: &[Option<&str>]) -> SyncSession {
        SyncSession::create(
            NewSync {
                session_id: SyncId::parse("s1").unwrap(),
                owner: None,
                channel_id: None,
                sync_mode: mode,
                participants: groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (format!("p{i}"), g.map(str::to_owned)))
                    .collect(),
                total_time_ms: 60_000,
                time_per_cycle_ms: 10_000,
                increment_ms: 2_000,
                max_time_ms: 0,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn per_participant_banks_with_fischer_increment_pause_and_expiry() {
        let s = new(SyncMode::PerParticipant, &[None, None]);
        let s = s.apply(&SyncAction::Start, 1_000).unwrap();
        assert_eq!((s.status, s.version), (SyncStatus::Running, 2));
        assert_eq!(s.remaining_ms(11_000), Some(50_000));
        // p0 moves after 10 s: 50 s left plus 2 s increment; p1 runs.
        let s = s.apply(&SyncAction::Switch(None), 11_000).unwrap();
        assert_eq!(s.participant_remaining_ms(11_000), [52_000, 60_000]);
        assert_eq!(s.active_participant_id.as_deref(), Some("p1"));
        // Pause freezes p1 at 55 s; resume continues from there.
        let s = s.apply(&SyncAction::Pause, 16_000).unwrap();
        assert_eq!(s.participant_remaining_ms(99_000), [52_000, 55_000]);
        assert_eq!(s.deadline(), None);
        let s = s.apply(&SyncAction::Resume, 100_000).unwrap();
        assert_eq!(s.deadline(), Some(155_000));
        // Nobody calls: at the deadline the scheduler expires it, charging exactly 55 s.
        assert!(s.apply(&SyncAction::Expire, 154_999).is_err());
        let e = s.apply(&SyncAction::Expire, 155_500).unwrap();
        assert_eq!(e.status, SyncStatus::Expired);
        assert!(e.participants[1].has_expired);
        assert_eq!(e.participants[1].time_used_ms, 60_000);
        assert_eq!(e.session_completed_at, Some(155_000));
        // A late switch is refused: the clock had run out.
        assert!(s.apply(&SyncAction::Switch(None), 156_000).is_err());
    }

    #[test]
    fn per_cycle_restarts_each_turn() {
        let s = new(SyncMode::PerCycle, &[None, None, None]);
        let s = s.apply(&SyncAction::Start, 0).unwrap();
        assert_eq!(s.remaining_ms(4_000), Some(6_000));
        let s = s.apply(&SyncAction::Pause, 4_000).unwrap();
        let s = s.apply(&SyncAction::Resume, 50_000).unwrap();
        assert_eq!(s.remaining_ms(51_000), Some(5_000));
        let s = s
            .apply(&SyncAction::Switch(Some("p2".into())), 51_000)
            .unwrap();
        assert_eq!(s.remaining_ms(51_000), Some(10_000));
        assert_eq!(s.deadline(), Some(61_000));
        assert_eq!(s.participants[0].time_used_ms, 5_000);
        assert_eq!(s.participants[2].cycle_count, 1);
    }

    #[test]
    fn per_group_shares_a_bank() {
        let s = new(
            SyncMode::PerGroup,
            &[Some("red"), Some("blue"), Some("red")],
        );
        let s = s.apply(&SyncAction::Start, 0).unwrap();
        let s = s.apply(&SyncAction::Switch(None), 20_000).unwrap(); // red used 20 s
        let s = s.apply(&SyncAction::Switch(None), 30_000).unwrap(); // blue used 10 s
        // p2 is red: the red bank has 40 s left, minus what runs now.
        assert_eq!(s.remaining_ms(35_000), Some(35_000));
        assert_eq!(s.participant_remaining_ms(35_000), [35_000, 50_000, 35_000]);
        assert_eq!(s.deadline(), Some(70_000));
        assert!(
            SyncSession::create(
                NewSync {
                    session_id: SyncId::parse("g").unwrap(),
                    owner: None,
                    channel_id: None,
                    sync_mode: SyncMode::PerGroup,
                    participants: vec![("a".into(), None)],
                    total_time_ms: 60_000,
                    time_per_cycle_ms: 0,
                    increment_ms: 0,
                    max_time_ms: 0,
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn global_runs_one_bank_whoever_is_active() {
        let s = new(SyncMode::Global, &[None, None]);
        let s = s.apply(&SyncAction::Start, 0).unwrap();
        let s = s.apply(&SyncAction::Switch(None), 25_000).unwrap();
        assert_eq!(s.remaining_ms(30_000), Some(30_000));
        assert_eq!(s.deadline(), Some(60_000));
        let done = s.apply(&SyncAction::Complete, 40_000).unwrap();
        assert_eq!(done.status, SyncStatus::Completed);
        assert_eq!(done.remaining_ms(99_000), Some(20_000));
        assert!(done.apply(&SyncAction::Cancel, 41_000).is_err());
    }

    #[test]
    fn count_up_to_a_maximum_or_unbounded() {
        let mut s = new(SyncMode::CountUp, &[None]);
        assert_eq!(s.remaining_ms(0), None);
        s = s.apply(&SyncAction::Start, 0).unwrap();
        assert_eq!(s.deadline(), None);
        assert_eq!(s.participant_remaining_ms(7_000), [7_000]);
        let s = s.apply(&SyncAction::Cancel, 8_000).unwrap();
        assert_eq!(s.status, SyncStatus::Cancelled);
        let capped = new(SyncMode::CountUp, &[None])
            .apply(
                &SyncAction::Update {
                    total_time_ms: 0,
                    time_per_cycle_ms: 0,
                    increment_ms: 0,
                    max_time_ms: 30_000,
                },
                0,
            )
            .unwrap()
            .apply(&SyncAction::Start, 1_000)
            .unwrap();
        assert_eq!(capped.deadline(), Some(31_000));
        assert_eq!(
            capped.apply(&SyncAction::Expire, 31_000).unwrap().status,
            SyncStatus::Expired
        );
    }

    #[test]
    fn hostile_creations_are_refused() {
        let base = NewSync {
            session_id: SyncId::parse("s").unwrap(),
            owner: None,
            channel_id: None,
            sync_mode: SyncMode::Global,
            participants: vec![("a".into(), None)],
            total_time_ms: 60_000,
            time_per_cycle_ms: 0,
            increment_ms: 0,
            max_time_ms: 0,
        };
        let mut dup = base.clone();
        dup.participants.push(("a".into(), None));
        let mut many = base.clone();
        many.participants = (0..=MAX_PARTICIPANTS)
            .map(|i| (format!("p{i}"), None))
            .collect();
        let mut none = base.clone();
        none.participants.clear();
        let mut huge = base.clone();
        huge.total_time_ms = MAX_TIME_MS + 1;
        // An invalid id cannot even be named: the id type refuses it.
        assert!(SyncId::parse("a b").is_err());
        for bad in [dup, many, none, huge] {
            assert!(SyncSession::create(bad, 0).is_err());
        }
        assert!(SyncSession::create(base, 0).is_ok());
    }
}
