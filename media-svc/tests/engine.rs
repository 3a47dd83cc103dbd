//! The engine alone: a real client peer over loopback sends to a node send-transport and
//! receives from a node recv-transport.

#![allow(clippy::unwrap_used)]

#[path = "support/peer.rs"]
mod peer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use media_svc::engine::webrtc::WebrtcEngine;
use media_svc::engine::{Engine, PacketSink, Transport, TransportSpec};
use rtc::rtp;

#[derive(Default)]
struct Collect(Mutex<Vec<rtp::Packet>>);

impl PacketSink for Collect {
    fn on_rtp(&self, packet: rtp::Packet) {
        self.0.lock().unwrap().push(packet);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_flow_both_ways_over_loopback() {
    let engine = WebrtcEngine::default();
    let sink = Arc::new(Collect::default());
    let bind = "127.0.0.1:0".parse().unwrap();
    let up = engine
        .create(TransportSpec::Send { sink: sink.clone() }, bind, None)
        .await
        .unwrap();
    let down = engine
        .create(TransportSpec::Recv { ssrc: 4242 }, bind, None)
        .await
        .unwrap();

    let mut speaker = peer::Peer::new(false).await;
    let answer = speaker.answer(up.offer(), true).await;
    up.apply_answer(answer).await.unwrap();
    let mut listener = peer::Peer::new(false).await;
    let answer = listener.answer(down.offer(), false).await;
    down.apply_answer(answer).await.unwrap();
    speaker.wait_connected().await;
    listener.wait_connected().await;

    for i in 0..50u16 {
        speaker
            .send(i, u32::from(i) * 960, vec![0xF8, 1, 2, 3])
            .await;
        let pt = down.payload_type().await;
        let _ = down
            .write_rtp(rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: pt,
                    sequence_number: 1000 + i,
                    timestamp: u32::from(i) * 960,
                    ssrc: 4242,
                    ..Default::default()
                },
                payload: vec![9, 9, 9].into(),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    testkit::wait_until(Duration::from_secs(5), "packets both ways", || async {
        sink.0.lock().unwrap().len() >= 45 && listener.received().len() >= 45
    })
    .await
    .unwrap();
    let got = listener.received();
    assert_eq!(got[0].packet.header.ssrc, 4242);
    up.close().await;
    down.close().await;
    speaker.close().await;
    listener.close().await;
}
