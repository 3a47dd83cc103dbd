//! The browser client in headless Chromium against the whole stack (separate processes): two
//! pages sign in with the development token endpoint and join a channel; one holds the space
//! bar and talks with Chromium's fake microphone, the other hears it (inbound RTP packets and
//! audio energy rise) and shows who is speaking. Screenshots of both pages are saved under
//! `target/e2e-artifacts/`. With `TALKGROUP_E2E_URL` set, the pages open that URL (a stack
//! started by `scripts/dev`, say) instead of a stack of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use talkgroup_e2e::browser::{Browser, Page, artifact_dir};
use talkgroup_e2e::{Stack, Topology};

const WAIT: Duration = Duration::from_secs(20);

async fn sign_in_and_join(page: &Page, name: &str, channel: &str) {
    page.wait_for(
        "document.readyState === 'complete' && !!window.talkgroup",
        WAIT,
    )
    .await
    .unwrap();
    page.eval(&format!(
        "document.getElementById('name').value = {name:?};
         document.getElementById('signin-form').requestSubmit(); true"
    ))
    .await
    .unwrap();
    // The channel list comes from list-channels once the socket is open.
    let selector = format!("#channel-list button[data-channel={channel:?}]");
    page.wait_for(&format!("!!document.querySelector({selector:?})"), WAIT)
        .await
        .unwrap();
    page.eval(&format!(
        "document.querySelector({selector:?}).click(); true"
    ))
    .await
    .unwrap();
    page.wait_for(
        "document.getElementById('media').dataset.state === 'ready'",
        WAIT,
    )
    .await
    .unwrap();
}

async fn inbound(page: &Page) -> (f64, f64) {
    let v = page.eval("window.talkgroup.inboundAudio()").await.unwrap();
    (
        v["packetsReceived"].as_f64().unwrap_or(0.0),
        v["totalAudioEnergy"].as_f64().unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_talk_through_the_stack() {
    if talkgroup_e2e::browser::chromium_path().is_none() {
        // scripts/test installs Chromium; a missing browser must not pass silently there.
        assert!(
            std::env::var("TALKGROUP_ALLOW_NO_BROWSER").is_ok(),
            "Chromium is not installed (apt-get install chromium), and \
             TALKGROUP_ALLOW_NO_BROWSER is not set"
        );
        return;
    }
    // TALKGROUP_E2E_URL points the test at a running stack (such as `scripts/dev`'s) instead.
    let (_stack, url) = match std::env::var("TALKGROUP_E2E_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let stack = Stack::start(Topology {
                gateway_args: vec!["--dev-tokens".into()],
                ..Topology::default()
            })
            .await
            .unwrap();
            stack.ready().await.unwrap();
            let url = format!("http://{}/", stack.gateway(0));
            (Some(stack), url)
        }
    };

    let browser = tokio::task::spawn_blocking(Browser::launch)
        .await
        .unwrap()
        .unwrap();
    let cdp = browser.connect().await.unwrap();
    let ana = cdp.new_page(&url).await.unwrap();
    let ben = cdp.new_page(&url).await.unwrap();
    sign_in_and_join(&ana, "Ana", "ops").await;
    sign_in_and_join(&ben, "Ben", "ops").await;
    // Each sees the other present.
    ana.wait_for(
        "document.querySelectorAll('#members li').length === 2",
        WAIT,
    )
    .await
    .unwrap();

    // Ben hears nothing while nobody talks (the muted producers are not forwarded).
    let (quiet_packets, _) = inbound(&ben).await;

    // Ana holds the space bar: granted, her button shows it, Ben sees her as the speaker.
    ana.key(true, " ", "Space", 32).await.unwrap();
    ana.wait_for(
        "document.getElementById('ptt').dataset.state === 'talking'",
        WAIT,
    )
    .await
    .unwrap();
    ben.wait_for(
        "document.getElementById('speaker').textContent === 'Ana is talking'",
        WAIT,
    )
    .await
    .unwrap();

    // Ben receives her audio: packets and energy rise (Chromium's fake microphone beeps).
    let script = format!(
        "window.talkgroup.inboundAudio().then(s => s && s.packetsReceived > {} + 50 && s.totalAudioEnergy > 0)",
        quiet_packets
    );
    ben.wait_for(&script, WAIT).await.unwrap();
    let (packets, energy) = inbound(&ben).await;
    assert!(packets > quiet_packets + 50.0, "{packets} packets");
    assert!(energy > 0.0, "no audio energy");

    // Ben presses while Ana talks: denied, naming Ana.
    ben.key(true, " ", "Space", 32).await.unwrap();
    let denied = ben
        .wait_for("document.getElementById('denied').textContent", WAIT)
        .await
        .unwrap();
    assert_eq!(denied, Value::from("Denied: Ana is talking"));
    ben.key(false, " ", "Space", 32).await.unwrap();

    let dir = artifact_dir();
    ana.screenshot(&dir.join("browser-speaker.png"))
        .await
        .unwrap();
    ben.screenshot(&dir.join("browser-listener.png"))
        .await
        .unwrap();

    // Ana lets go: the floor is free on both pages.
    ana.key(false, " ", "Space", 32).await.unwrap();
    ben.wait_for(
        "document.getElementById('speaker').textContent === 'Nobody is talking'",
        WAIT,
    )
    .await
    .unwrap();
    ana.wait_for(
        "document.getElementById('ptt').dataset.state === 'idle'",
        WAIT,
    )
    .await
    .unwrap();
    drop(browser);
}
