//! `ptt-load` against a stack it starts itself: it completes, reports, and sees no double
//! grant under contention across two gateways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use talkgroup_e2e::binary;

#[test]
fn ptt_load_reports_a_contended_run_without_double_grants() {
    let out_dir = std::env::temp_dir().join(format!("ptt-load-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let json = out_dir.join("report.json");
    let output = std::process::Command::new(binary("ptt-load").unwrap())
        .args([
            "--spawn",
            "1,1,2",
            "--clients",
            "24",
            "--channels",
            "4",
            "--duration-s",
            "3",
            "--audio-channels",
            "1",
            "--pattern",
            "contention",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("| press → granted |"), "{stdout}");
    assert!(stderr.contains("pressing: Contention pattern"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["clients"], 24);
    assert_eq!(report["failedClients"], 0);
    assert_eq!(report["doubleGrants"], 0);
    assert_eq!(report["errors"], 0);
    assert!(report["grants"].as_u64().unwrap() > 3, "{report}");
    // Three contenders a round: two denials for every grant, plus the bystander probes.
    assert!(
        report["denials"].as_u64().unwrap() >= 2 * report["grants"].as_u64().unwrap(),
        "{report}"
    );
    assert!(
        report["audio"]["framesReceived"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["latency"]["pressToGrant"]["n"], report["grants"]);
    // Server figures from every service's /metrics (2 gateways, state, media).
    assert_eq!(report["server"].as_array().unwrap().len(), 4, "{report}");
    let _ = std::fs::remove_dir_all(&out_dir);
}
