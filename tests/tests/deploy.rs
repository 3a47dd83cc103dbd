//! The deployment files and the binaries agree: every `PTT_*` variable the Kubernetes
//! manifests set is one the service it is set for accepts (as its `--help` lists it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use talkgroup_e2e::binary;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// Every `PTT_<SERVICE>_<FIELD>` name set in the manifests (`- name: PTT_...`).
fn manifest_vars() -> BTreeSet<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files = Vec::new();
    yaml_files(&deploy, &mut files);
    assert!(files.len() >= 5, "deploy/ manifests not found");
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| l.trim().strip_prefix("- name: ").map(str::to_owned))
                .filter(|n| n.starts_with("PTT_"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn help_vars(bin: &str) -> BTreeSet<String> {
    let out = Command::new(binary(bin).unwrap())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} --help failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next().map(str::to_owned))
        .collect()
}

#[test]
fn every_env_var_in_the_manifests_is_accepted_by_its_binary() {
    let vars = manifest_vars();
    assert!(vars.len() > 20, "too few variables found: {vars:?}");
    let services = [
        ("PTT_STATE_", "state-svc"),
        ("PTT_MEDIA_", "media-svc"),
        ("PTT_SIGNALING_", "signaling-svc"),
    ];
    let mut unknown = Vec::new();
    for var in &vars {
        // The TLS flags are the same on every service.
        let bins: Vec<&str> = if var.starts_with("PTT_TLS_") {
            services.iter().map(|(_, bin)| *bin).collect()
        } else {
            let (_, bin) = services
                .iter()
                .find(|(prefix, _)| var.starts_with(prefix))
                .unwrap_or_else(|| panic!("{var} names no service"));
            vec![*bin]
        };
        for bin in bins {
            if !help_vars(bin).contains(var) {
                unknown.push(format!("{var} ({bin})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not accepted by their binaries: {unknown:?}"
    );
}
