//! A network namespace joined to this host by a veth pair, for tests of what crosses a hard
//! network: the namespace is a client host (`ns_ip`), this host is the server side
//! (`host_ip`), and nftables rules inside the namespace shape what gets through. Everything is
//! created by the test and removed when the [`Netns`] is dropped. Needs root, `ip` (iproute2)
//! and `nft` (nftables).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// A namespace and its veth link to this host.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// This host's end of the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's end of the link.
    pub ns_ip: Ipv4Addr,
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when this process can build namespaces (root, with `ip` and `nft` installed).
pub fn available() -> bool {
    let root = run("id", &["-u"]).is_ok_and(|u| u.trim() == "0");
    root && run("ip", &["-V"]).is_ok() && run("nft", &["--version"]).is_ok()
}

impl Netns {
    /// A fresh namespace on its own /30, with loopback up.
    pub fn create() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 4000) * 16 + n % 16;
        let name = format!("tg-test-{id}");
        let host_if = format!("tgh{id}");
        let ns_if = format!("tgn{id}");
        // 10.213.0.0/16 cut into /30s: .1 this host, .2 the namespace.
        let block = (id % 16_000) * 4;
        let (b2, b3) = (
            u8::try_from(block / 256).unwrap_or(0),
            u8::try_from(block % 256).unwrap_or(0),
        );
        let host_ip = Ipv4Addr::new(10, 213, b2, b3 + 1);
        let ns_ip = Ipv4Addr::new(10, 213, b2, b3 + 2);
        // Left over from a run that was killed.
        let _ = run("ip", &["netns", "del", &name]);
        let _ = run("ip", &["link", "del", &host_if]);
        let netns = Self {
            name,
            host_if,
            ns_if: ns_if.clone(),
            host_ip,
            ns_ip,
        };
        let ns = netns.name.as_str();
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &netns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns_if,
            ],
        )?;
        run("ip", &["link", "set", &ns_if, "netns", ns])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{host_ip}/30"),
                "dev",
                &netns.host_if,
            ],
        )?;
        run("ip", &["link", "set", &netns.host_if, "up"])?;
        netns.exec(
            "ip",
            &["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if],
        )?;
        netns.exec("ip", &["link", "set", &ns_if, "up"])?;
        netns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Makes the namespace receive as a host of its own would. On a veth link (as on
    /// loopback) the receiver's whole kernel path, down to waking the receiving process, runs
    /// inside the *sender's* system call, so a server sending to clients in the namespace is
    /// billed for their receiving too. With GRO on the namespace's end its veth receives
    /// through NAPI, and threaded NAPI runs that in a kernel thread of its own; this host's
    /// end gets a queue (pfifo), so a burst waits for that thread instead of being dropped,
    /// as a burst waits in a real NIC's queue. Returns the receiving threads' ids (`napi/..`),
    /// so a caller can lower their priority as it would the clients'. Needs `ethtool`.
    pub fn receive_in_own_thread(&self) -> Result<Vec<u32>> {
        self.exec(
            "ethtool",
            &[
                "-K",
                &self.ns_if,
                "gro",
                "on",
                "rx-udp-gro-forwarding",
                "on",
            ],
        )?;
        self.exec(
            "sh",
            &[
                "-c",
                &format!("echo 1 > /sys/class/net/{}/threaded", self.ns_if),
            ],
        )?;
        run(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.host_if,
                "root",
                "pfifo",
                "limit",
                "20000",
            ],
        )?;
        let prefix = format!("napi/{}-", self.ns_if);
        let mut threads = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with(&prefix))
            {
                threads.push(pid);
            }
        }
        if threads.is_empty() {
            bail!(
                "no NAPI thread for {}: this kernel's veth did not switch to threaded NAPI",
                self.ns_if
            );
        }
        Ok(threads)
    }

    /// The namespace's file, for `setns` by a thread that should make its sockets there.
    pub fn file(&self) -> Result<std::fs::File> {
        let path = format!("/var/run/netns/{}", self.name);
        std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))
    }

    /// Drops every UDP datagram into and out of the namespace (a network that allows only
    /// TCP), counting them.
    pub fn block_udp(&self) -> Result<()> {
        let rules = "table inet talkgroup_test {
  chain out { type filter hook output priority 0; policy accept; meta l4proto udp counter drop; }
  chain in { type filter hook input priority 0; policy accept; meta l4proto udp counter drop; }
}
";
        self.load(rules)
    }

    /// Lets out of the namespace only TCP to `ports` (of any host): no UDP at all, no other
    /// TCP; loopback inside the namespace stays open. What is dropped is counted.
    pub fn allow_only_tcp_to(&self, ports: &[u16]) -> Result<()> {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet talkgroup_test {{
  chain out {{
    type filter hook output priority 0; policy accept;
    oifname \"lo\" accept;
    meta l4proto udp counter drop;
    tcp dport {{ {ports} }} accept;
    meta l4proto tcp counter drop;
  }}
}}
"
        );
        self.load(&rules)
    }

    fn load(&self, rules: &str) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&file, rules)?;
        let path = file.to_string_lossy().into_owned();
        let loaded = self.exec("nft", &["-f", &path]);
        let _ = std::fs::remove_file(&file);
        loaded.map(drop)
    }

    /// A tokio runtime whose threads live in the namespace: sockets made by what runs on it
    /// (a client peer, built there) are the namespace's, under its rules.
    pub fn runtime(&self) -> Result<NsRuntime> {
        let file = self.file()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Threads inherit the namespace of the thread that makes them: the runtime's
            // workers and blocking threads are all made from here, after the switch.
            if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(anyhow::anyhow!("setns: {e}")));
                return;
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(runtime.handle().clone()));
            runtime.block_on(async move {
                let _ = stop_rx.await;
            });
        });
        let handle = ready_rx.recv().context("namespace thread")??;
        Ok(NsRuntime {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Packets the namespace's rules dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        let listing = self.exec("nft", &["list", "table", "inet", "talkgroup_test"])?;
        // "... counter packets 12 bytes 3456 drop"
        Ok(listing
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it this host's.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// A runtime inside a namespace ([`Netns::runtime`]); it stops when dropped.
#[derive(Debug)]
pub struct NsRuntime {
    pub handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
