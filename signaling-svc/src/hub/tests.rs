//! The hub's unit tests: hold-back, delivery through connections, sharding, membership
//! deltas, and what reaches a user.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::extract::ws::Message;

use super::*;
use crate::outbox::Outgoing;

fn floor(channel: &str, session: &str, epoch: u64) -> pb::watch_event::Event {
    let speaker = pb::Speaker {
        session_id: session.to_owned(),
        user_id: format!("u-{session}"),
        user_name: session.to_owned(),
        priority: 0,
    };
    pb::watch_event::Event::Floor(pb::FloorChanged {
        channel_id: channel.to_owned(),
        holder: Some(pb::FloorHolder {
            speaker: Some(speaker),
            epoch,
            ..Default::default()
        }),
        epoch,
        reason: pb::FloorReason::Granted.into(),
        ..Default::default()
    })
}

/// The epoch of a `speaker-changed` push in a member's outbox.
fn epoch_of(out: Outgoing) -> u64 {
    match out {
        Outgoing::Message(Message::Text(text)) => {
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            assert_eq!(frame["type"], "speaker-changed");
            frame["data"]["epoch"].as_u64().unwrap()
        }
        other => panic!("a speaker-changed push, not {other:?}"),
    }
}

/// A member's outbox, read as the writer would.
struct Reader(crate::outbox::OutboxReader);

impl Reader {
    fn try_recv(&mut self) -> Result<Outgoing, ()> {
        futures::FutureExt::now_or_never(self.recv())
            .flatten()
            .ok_or(())
    }

    async fn recv(&mut self) -> Option<Outgoing> {
        let (item, receipt) = self.0.recv().await?;
        self.0.written(receipt);
        Some(item)
    }
}

/// A member following "ch" that the changes below do not concern: its pushes go straight
/// to its outbox.
fn member(hub: &Hub) -> (mpsc::Receiver<HubEvent>, Reader) {
    let (out, outbox) = crate::outbox::outbox(1 << 20);
    let mut outbox = Reader(outbox);
    let (conn, events) = hub.register("u-listener", "s-listener", out);
    hub.follow(conn, "ch");
    hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
        channel_id: "ch".into(),
        ..Default::default()
    }));
    assert!(matches!(
        outbox.try_recv(),
        Ok(Outgoing::Message(Message::Text(_)))
    ));
    (events, outbox)
}

#[tokio::test]
async fn a_change_waits_for_its_requesters_reply_and_later_ones_queue_behind() {
    let hub = Hub::new();
    let (mut events, mut rx) = member(&hub);

    hub.request_started("ch", "s-ana");
    hub.dispatch(floor("ch", "s-ana", 5));
    hub.dispatch(floor("ch", "s-bo", 6));
    hub.request_done("ch", "s-someone-else");
    assert!(rx.try_recv().is_err(), "held until Ana's reply is out");
    hub.request_done("ch", "s-ana");
    assert_eq!(epoch_of(rx.try_recv().unwrap()), 5);
    assert_eq!(epoch_of(rx.try_recv().unwrap()), 6);

    // A change nobody here asked for goes out at once.
    hub.dispatch(floor("ch", "s-cai", 7));
    assert_eq!(epoch_of(rx.try_recv().unwrap()), 7);
    assert!(
        events.try_recv().is_err(),
        "nothing for the connection itself"
    );
}

#[tokio::test]
async fn changes_of_a_held_floor_go_through_the_connection() {
    let hub = Hub::new();
    let (out, _outbox) = crate::outbox::outbox(1 << 20);
    let (conn, mut events) = hub.register("u-ana", "s-ana", out);
    hub.follow(conn, "ch");
    hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
        channel_id: "ch".into(),
        ..Default::default()
    }));
    // Named in the change: the connection acts on it.
    hub.dispatch(floor("ch", "s-ana", 5));
    assert!(matches!(events.try_recv(), Ok(HubEvent::Floor(_))));
    // Holding the floor, a change naming others still goes through it.
    hub.holding(conn, "ch", true);
    hub.dispatch(floor("ch", "s-bo", 6));
    assert!(matches!(events.try_recv(), Ok(HubEvent::Floor(_))));
    hub.holding(conn, "ch", false);
    hub.dispatch(floor("ch", "s-cai", 7));
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn a_requester_that_never_finishes_holds_back_only_for_a_moment() {
    let hub = Hub::new();
    let (_events, mut rx) = member(&hub);
    hub.request_started("ch", "s-ana");
    let started = tokio::time::Instant::now();
    hub.dispatch(floor("ch", "s-ana", 5));
    let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(epoch_of(event), 5);
    assert!(started.elapsed() >= HOLD_BACK_AT_MOST);
}

#[tokio::test]
async fn an_event_the_connection_cannot_take_closes_it_instead_of_being_dropped() {
    let hub = Hub::new();
    let (out, _outbox) = crate::outbox::outbox(1 << 20);
    let (_conn, mut events) = hub.register("u-ana", "s-ana", out.clone());
    for _ in 0..CONNECTION_EVENTS {
        hub.dispatch(pb::watch_event::Event::Kicked(pb::UserKicked {
            user_id: "u-ana".into(),
            reason: "bye".into(),
        }));
    }
    assert!(out.failure().is_none(), "the queue holds them all");
    hub.dispatch(pb::watch_event::Event::Kicked(pb::UserKicked {
        user_id: "u-ana".into(),
        reason: "bye".into(),
    }));
    assert_eq!(out.failure(), Some(crate::outbox::Failure::Overflow));
    assert!(matches!(events.try_recv(), Ok(HubEvent::Kicked(_))));
}

#[tokio::test]
async fn channels_spread_over_streams_and_a_full_hub_refuses_new_ones() {
    let hub = Hub::with_shards(Shards {
        streams: 2,
        channels_per_stream: 3,
    });
    let (out, _outbox) = crate::outbox::outbox(1 << 20);
    let (a, _) = hub.register("u-a", "s-a", out.clone());
    let (b, _) = hub.register("u-b", "s-b", out);
    for ch in ["c1", "c2", "c3", "c4"] {
        assert!(hub.follow(a, ch));
    }
    assert!(hub.follow(b, "c1"), "a followed channel takes no room");
    assert!(hub.follow(b, "c5") && hub.follow(b, "c6"));
    assert!(!hub.has_room_for("c7"));
    assert!(!hub.follow(b, "c7"), "every stream is full");
    assert!(hub.has_room_for("c1"));
    let sets: Vec<HashSet<Topic>> = hub
        .wanted
        .iter()
        .map(|w| channels_of(&w.borrow()))
        .collect();
    assert!(sets.iter().all(|s| s.len() == 3), "{sets:?}");
    assert!(sets[0].is_disjoint(&sets[1]));
    // A channel nobody follows any more frees its room; a channel still followed does not.
    hub.unfollow(a, "c1");
    assert!(!hub.has_room_for("c7"), "b still follows c1");
    hub.unregister(b);
    assert!(hub.follow(a, "c7"));
    let followed: usize = hub
        .wanted
        .iter()
        .map(|w| channels_of(&w.borrow()).len())
        .sum();
    assert_eq!(followed, 4, "c2, c3, c4 and c7");
}

fn membership(
    session: &str,
    user: &str,
    change: pb::MembershipChange,
    version: u64,
) -> pb::watch_event::Event {
    pb::watch_event::Event::Membership(pb::MembershipChanged {
        channel_id: "ch".into(),
        member: Some(pb::Member {
            session_id: session.into(),
            user_id: user.into(),
            user_name: user.into(),
            ..Default::default()
        }),
        change: change.into(),
        version,
        ..Default::default()
    })
}

#[tokio::test]
async fn membership_changes_go_out_as_versioned_per_user_deltas() {
    use pb::MembershipChange::{Joined, Left};
    let hub = Hub::new();
    let (out, outbox) = crate::outbox::outbox(1 << 20);
    let mut outbox = Reader(outbox);
    let (conn, _events) = hub.register("u-l", "s-l", out);
    hub.follow(conn, "ch");
    hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
        channel_id: "ch".into(),
        members_version: 10,
        ..Default::default()
    }));
    assert!(outbox.try_recv().is_ok(), "the snapshot's channel-state");
    // Already in the snapshot: ignored. Ana's two sockets are one arrival; Bo comes and
    // goes; all within the coalescing window: one push.
    hub.dispatch(membership("s-old", "u-old", Joined, 9));
    hub.dispatch(membership("s-a1", "u-ana", Joined, 11));
    hub.dispatch(membership("s-a2", "u-ana", Joined, 12));
    hub.dispatch(membership("s-b", "u-bo", Joined, 13));
    hub.dispatch(membership("s-b", "u-bo", Left, 14));
    hub.dispatch(membership("s-a1", "u-ana", Left, 15));
    let pushed = tokio::time::timeout(Duration::from_secs(5), outbox.recv()).await;
    let Ok(Some(Outgoing::Message(Message::Text(text)))) = pushed else {
        panic!("a members-changed push");
    };
    let push: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(push["type"], "members-changed");
    assert_eq!(
        push["data"]["changes"],
        serde_json::json!([
            {"version": 11, "joined": {"userId": "u-ana", "userName": "u-ana"}},
            {"version": 13, "joined": {"userId": "u-bo", "userName": "u-bo"}},
            {"version": 14, "left": "u-bo"}
        ]),
        "Ana's second socket and her first one leaving change nothing: she is still there"
    );
    assert!(outbox.try_recv().is_err());
}

fn channels_of(set: &HashSet<Topic>) -> HashSet<Topic> {
    set.iter()
        .filter(|t| matches!(t, Topic::Channel(_)))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_user_is_followed_while_it_has_a_connection_and_its_events_reach_only_it() {
    let hub = Hub::new();
    let users = |hub: &Hub| -> HashSet<Topic> {
        hub.wanted
            .iter()
            .flat_map(|w| w.borrow().clone())
            .filter(|t| matches!(t, Topic::User(_)))
            .collect()
    };
    let (out, _outbox) = crate::outbox::outbox(1 << 20);
    let (a1, mut ana1) = hub.register("u-ana", "s-a1", out.clone());
    let (a2, mut ana2) = hub.register("u-ana", "s-a2", out.clone());
    let (_b, mut bo) = hub.register("u-bo", "s-b", out);
    assert_eq!(
        users(&hub),
        HashSet::from([Topic::User("u-ana".into()), Topic::User("u-bo".into())])
    );
    // A takeover of one session reaches only that session's connection.
    hub.dispatch(pb::watch_event::Event::Resumed(pb::SessionResumed {
        user_id: "u-ana".into(),
        session_id: "s-a2".into(),
        generation: 1,
    }));
    assert!(ana1.try_recv().is_err());
    assert!(matches!(
        ana2.try_recv(),
        Ok(HubEvent::Resumed { generation: 1, .. })
    ));
    hub.dispatch(pb::watch_event::Event::Grants(pb::UserGrants {
        user_id: "u-ana".into(),
        version: 7,
        ..Default::default()
    }));
    assert!(matches!(ana1.try_recv(), Ok(HubEvent::Grants(g)) if g.version == 7));
    assert!(matches!(ana2.try_recv(), Ok(HubEvent::Grants(_))));
    assert!(bo.try_recv().is_err(), "nothing of Ana's reaches Bo");
    hub.unregister(a1);
    assert_eq!(users(&hub).len(), 2, "Ana still has a connection");
    hub.unregister(a2);
    assert_eq!(users(&hub), HashSet::from([Topic::User("u-bo".into())]));
    let received = |kind| hub.received.get_or_create(&TopicKind { kind }).get();
    assert_eq!((received("user"), received("channel")), (2, 0));
}
