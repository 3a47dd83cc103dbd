//! pttctl: administration of a Talkgroup deployment over `ptt.admin.v1.AdminService`.
//!
//! Each subcommand is one admin call. Output is a plain table for people, or JSON with
//! `--json` for scripts. The admin token comes from `--token` or `PTT_ADMIN_TOKEN` and is never
//! printed. Exit codes: 0 success, 1 the call failed or an argument is invalid (the reason is
//! printed), 2 the command line does not parse.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use talkgroup_common::devcerts::DevCa;
use talkgroup_common::tls::{Expect, Identity, TlsArgs};
use talkgroup_proto::admin::v1 as apb;
use talkgroup_proto::state::v1 as spb;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Administer a Talkgroup deployment (state-svc's admin API).
#[derive(Debug, Parser)]
#[command(name = "pttctl", version, about)]
struct Cli {
    /// state-svc gRPC URL.
    #[arg(long, env = "PTT_ADMIN_URL", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Admin token (state-svc's --admin-token); every command but dev-certs needs it.
    #[arg(long, env = "PTT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Mutual TLS to state-svc: a certificate naming `spiffe://talkgroup/admin`.
    #[command(flatten)]
    tls: TlsArgs,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a call after this many milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Channels with members or media, with speaker and member counts.
    Channels,
    /// One channel: speaker, members, configuration, event.
    Channel { channel: String },
    /// Release a channel's floor, whoever holds it.
    Release { channel: String },
    /// Disconnect every session of a user.
    Kick {
        user: String,
        /// Shown to the user.
        #[arg(long, default_value = "disconnected by an administrator")]
        reason: String,
    },
    /// Live sessions, all or of one user.
    Sessions {
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 1_000)]
        limit: u32,
    },
    /// Media nodes with their load.
    Nodes,
    /// Stop placing new channels on a media node.
    Drain { node: String },
    /// A user's stored grants.
    Grants { user: String },
    /// Set a user's grants: CHANNEL=ROLE (none, member, listen, talk, dispatch, admin, or
    /// `unset` to fall back to the token).
    Grant {
        user: String,
        #[arg(required = true)]
        grants: Vec<String>,
        /// Drop every stored grant not named.
        #[arg(long)]
        replace: bool,
    },
    /// Set an event's channels (none: delete the event).
    SetEvent {
        event: String,
        channels: Vec<String>,
    },
    /// An event's channels and emergency state.
    Event { event: String },
    /// Who is talking in each channel of an event.
    Speakers { event: String },
    /// Release every floor of an event.
    Pause { event: String },
    /// End the emergency broadcast of an event, whoever runs it.
    StopEmergency { event: String },
    /// Who talked, when, for how long, and who cut in (needs the audit database).
    History {
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Hours back from now.
        #[arg(long, default_value_t = 24)]
        hours: i64,
        #[arg(long, default_value_t = 1_000)]
        limit: u32,
    },
    /// A sync session's changes (needs the audit database).
    SyncHistory { session: String },
    /// Write a throwaway CA and a certificate for every service identity into a directory,
    /// for a local stack with mutual TLS (never for production: the certificates are
    /// self-issued and last a week).
    DevCerts {
        /// Where to write ca.crt and <name>.crt/<name>.key.
        #[arg(long)]
        out: std::path::PathBuf,
        /// A media node id to issue a certificate for (repeatable).
        #[arg(long = "media-node", default_value = "media-1")]
        media_nodes: Vec<String>,
        /// DNS names or IP addresses every certificate also names.
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
    },
}

/// Adds the admin token to every call.
type AuthInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Admin =
    apb::admin_service_client::AdminServiceClient<InterceptedService<Channel, AuthInterceptor>>;

fn connect(cli: &Cli) -> Result<Admin> {
    let token = cli
        .token
        .as_deref()
        .context("an admin token is needed (--token or PTT_ADMIN_TOKEN)")?;
    let security = cli
        .tls
        .security("pttctl", |id| *id == Identity::Admin)
        .map_err(anyhow::Error::msg)?;
    let channel = talkgroup_common::grpc::channel(
        &cli.server,
        Some(Duration::from_millis(cli.timeout_ms)),
        &security,
        Expect::Exactly(Identity::State),
    )
    .context("invalid --server URL")?;
    let header: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the token has characters a header cannot carry")?;
    let auth: AuthInterceptor = Box::new(move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", header.clone());
        Ok(request)
    });
    Ok(apb::admin_service_client::AdminServiceClient::with_interceptor(channel, auth))
}

fn role_name(raw: i32) -> &'static str {
    match spb::Role::try_from(raw) {
        Ok(spb::Role::None) => "none",
        Ok(spb::Role::Member) => "member",
        Ok(spb::Role::Listen) => "listen",
        Ok(spb::Role::Talk) => "talk",
        Ok(spb::Role::Dispatch) => "dispatch",
        Ok(spb::Role::Admin) => "admin",
        _ => "unspecified",
    }
}

fn parse_role(raw: &str) -> Result<spb::Role> {
    Ok(match raw {
        "none" => spb::Role::None,
        "member" => spb::Role::Member,
        "listen" => spb::Role::Listen,
        "talk" => spb::Role::Talk,
        "dispatch" => spb::Role::Dispatch,
        "admin" => spb::Role::Admin,
        "unset" => spb::Role::Unspecified,
        other => bail!("unknown role {other:?}"),
    })
}

fn holder_json(h: Option<&spb::FloorHolder>) -> Value {
    h.and_then(|h| h.speaker.as_ref().map(|s| (h, s)))
        .map(|(h, s)| {
            json!({"userId": s.user_id, "userName": s.user_name, "sessionId": s.session_id,
                   "priority": s.priority, "epoch": h.epoch, "grantedAtMs": h.granted_at_ms,
                   "expiresAtMs": h.expires_at_ms})
        })
        .unwrap_or(Value::Null)
}

fn speaker_cell(v: &Value) -> String {
    v["userName"]
        .as_str()
        .map_or_else(|| "-".to_owned(), str::to_owned)
}

fn grants_json(g: &spb::UserGrants) -> Value {
    json!({
        "userId": g.user_id,
        "version": g.version,
        "grants": g.grants.iter().map(|g| json!({"channelId": g.channel_id, "role": role_name(g.role)})).collect::<Vec<_>>(),
    })
}

fn event_json(e: &spb::Event) -> Value {
    json!({
        "eventId": e.event_id,
        "channelIds": e.channel_ids,
        "emergency": e.emergency.as_ref().map(|m| json!({
            "by": m.by.as_ref().map(|s| json!({"userId": s.user_id, "userName": s.user_name})),
            "startedAtMs": m.started_at_ms,
        })),
    })
}

fn node_json(n: &spb::MediaNode) -> Value {
    json!({"nodeId": n.node_id, "grpcAddr": n.grpc_addr, "announcedIp": n.announced_ip,
           "capacity": n.capacity, "load": n.load, "channels": n.channels,
           "draining": n.draining, "live": n.live, "lastHeartbeatMs": n.last_heartbeat_ms})
}

fn session_json(s: &spb::Session) -> Value {
    json!({"sessionId": s.session_id, "userId": s.user_id, "userName": s.user_name,
           "gatewayId": s.gateway_id, "createdAtMs": s.created_at_ms,
           "expiresAtMs": s.expires_at_ms, "channelIds": s.channel_ids})
}

/// A table with a header row and left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

/// Runs the command: the JSON document and its table rendering.
/// Issues the local stack's certificates.
fn dev_certs(
    out: &std::path::Path,
    media_nodes: &[String],
    names: &[String],
) -> Result<(Value, String)> {
    let ca = DevCa::new("Talkgroup development CA").context("cannot create the CA")?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut identities = vec![
        ("state".to_owned(), Identity::State),
        ("gateway".to_owned(), Identity::Gateway),
        ("admin".to_owned(), Identity::Admin),
    ];
    for node in media_nodes {
        let identity = Identity::parse(&format!("media/{node}"))
            .with_context(|| format!("invalid media node id {node:?}"))?;
        identities.push((format!("media-{node}"), identity));
    }
    let mut written = Vec::new();
    let mut text = format!("CA        {}\n", out.join("ca.crt").display());
    for (name, identity) in &identities {
        let files = ca
            .write(out, name, identity, &names)
            .with_context(|| format!("cannot write {}", out.display()))?;
        text.push_str(&format!(
            "{:<9} {} {}\n",
            identity.to_string(),
            files.cert.display(),
            files.key.display()
        ));
        written
            .push(json!({"identity": identity.to_string(), "cert": files.cert, "key": files.key}));
    }
    Ok((
        json!({"ca": out.join("ca.crt"), "certificates": written}),
        text.trim_end().to_owned(),
    ))
}

async fn run(cli: &Cli) -> Result<(Value, String)> {
    if let Command::DevCerts {
        out,
        media_nodes,
        names,
    } = &cli.command
    {
        return dev_certs(out, media_nodes, names);
    }
    let mut admin = connect(cli)?;
    Ok(match &cli.command {
        Command::Channels => {
            let list = admin
                .list_channels(apb::ListChannelsRequest {})
                .await?
                .into_inner();
            let items: Vec<Value> = list
                .channels
                .iter()
                .map(|c| {
                    json!({"channelId": c.channel_id, "speaker": holder_json(c.holder.as_ref()),
                           "memberCount": c.member_count, "mediaNodeId": c.media_node_id,
                           "eventId": c.event_id})
                })
                .collect();
            let rows = items
                .iter()
                .map(|c| {
                    vec![
                        c["channelId"].as_str().unwrap_or_default().to_owned(),
                        speaker_cell(&c["speaker"]),
                        c["memberCount"].to_string(),
                        c["mediaNodeId"].as_str().unwrap_or_default().to_owned(),
                        c["eventId"].as_str().unwrap_or_default().to_owned(),
                    ]
                })
                .collect::<Vec<_>>();
            let text = table(
                &["CHANNEL", "SPEAKER", "MEMBERS", "MEDIA NODE", "EVENT"],
                &rows,
            );
            (json!({"channels": items}), text)
        }
        Command::Channel { channel } => {
            let detail = admin
                .get_channel(apb::GetChannelRequest {
                    channel_id: channel.clone(),
                })
                .await?
                .into_inner();
            let state = detail.state.unwrap_or_default();
            let config = detail.config.unwrap_or_default();
            let members: Vec<Value> = state
                .members
                .iter()
                .map(|m| json!({"userId": m.user_id, "userName": m.user_name, "sessionId": m.session_id}))
                .collect();
            let doc = json!({
                "channelId": state.channel_id, "speaker": holder_json(state.holder.as_ref()),
                "epoch": state.epoch, "members": members, "mediaNodeId": state.media_node_id,
                "eventId": detail.event_id,
                "config": {"queueEnabled": config.queue_enabled, "leaseMs": config.lease_ms, "maxTalkMs": config.max_talk_ms},
            });
            let rows = vec![
                vec!["channel".into(), state.channel_id.clone()],
                vec!["speaker".into(), speaker_cell(&doc["speaker"])],
                vec!["epoch".into(), state.epoch.to_string()],
                vec![
                    "members".into(),
                    state
                        .members
                        .iter()
                        .map(|m| m.user_name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                ],
                vec!["media node".into(), state.media_node_id.clone()],
                vec!["event".into(), detail.event_id.clone()],
            ];
            (doc, table(&["FIELD", "VALUE"], &rows))
        }
        Command::Release { channel } => {
            let r = admin
                .force_release_floor(apb::ForceReleaseFloorRequest {
                    channel_id: channel.clone(),
                })
                .await?
                .into_inner();
            let text = if r.released {
                format!("released {channel} (epoch {})", r.epoch)
            } else {
                format!("{channel}: nobody was talking")
            };
            (json!({"released": r.released, "epoch": r.epoch}), text)
        }
        Command::Kick { user, reason } => {
            let r = admin
                .kick_user(apb::KickUserRequest {
                    user_id: user.clone(),
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            (
                json!({"sessionsClosed": r.sessions_closed}),
                format!("{user}: {} session(s) closed", r.sessions_closed),
            )
        }
        Command::Sessions { user, limit } => {
            let r = admin
                .list_sessions(apb::ListSessionsRequest {
                    user_id: user.clone().unwrap_or_default(),
                    limit: *limit,
                })
                .await?
                .into_inner();
            let rows = r
                .sessions
                .iter()
                .map(|s| {
                    vec![
                        s.session_id.clone(),
                        s.user_id.clone(),
                        s.user_name.clone(),
                        s.gateway_id.clone(),
                        s.channel_ids.join(","),
                    ]
                })
                .collect::<Vec<_>>();
            (
                json!({"sessions": r.sessions.iter().map(session_json).collect::<Vec<_>>()}),
                table(&["SESSION", "USER", "NAME", "GATEWAY", "CHANNELS"], &rows),
            )
        }
        Command::Nodes => {
            let r = admin
                .list_media_nodes(apb::ListMediaNodesRequest {})
                .await?
                .into_inner();
            let rows = r
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.clone(),
                        n.grpc_addr.clone(),
                        n.announced_ip.clone(),
                        format!("{}/{}", n.load, n.capacity),
                        n.channels.to_string(),
                        if !n.live {
                            "dead"
                        } else if n.draining {
                            "draining"
                        } else {
                            "live"
                        }
                        .to_owned(),
                    ]
                })
                .collect::<Vec<_>>();
            (
                json!({"nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>()}),
                table(&["NODE", "GRPC", "IP", "LOAD", "CHANNELS", "STATE"], &rows),
            )
        }
        Command::Drain { node } => {
            let n = admin
                .drain_media_node(apb::DrainMediaNodeRequest {
                    node_id: node.clone(),
                })
                .await?
                .into_inner();
            (node_json(&n), format!("{node}: draining"))
        }
        Command::Grants { user } => {
            let g = admin
                .get_user_grants(spb::GetUserGrantsRequest {
                    user_id: user.clone(),
                })
                .await?
                .into_inner();
            grants_output(&g)
        }
        Command::Grant {
            user,
            grants,
            replace,
        } => {
            let grants = grants
                .iter()
                .map(|g| {
                    let (channel, role) = g
                        .split_once('=')
                        .with_context(|| format!("{g:?}: expected CHANNEL=ROLE"))?;
                    Ok(spb::Grant {
                        channel_id: channel.to_owned(),
                        role: parse_role(role)?.into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let g = admin
                .set_user_grants(spb::SetUserGrantsRequest {
                    user_id: user.clone(),
                    grants,
                    replace: *replace,
                })
                .await?
                .into_inner();
            grants_output(&g)
        }
        Command::SetEvent { event, channels } => {
            let e = admin
                .set_event_channels(spb::SetEventChannelsRequest {
                    event_id: event.clone(),
                    channel_ids: channels.clone(),
                })
                .await?
                .into_inner();
            event_output(&e)
        }
        Command::Event { event } => {
            let e = admin
                .get_event(spb::GetEventRequest {
                    event_id: event.clone(),
                })
                .await?
                .into_inner();
            event_output(&e)
        }
        Command::Speakers { event } => {
            let r = admin
                .event_speakers(spb::GetEventRequest {
                    event_id: event.clone(),
                })
                .await?
                .into_inner();
            let items: Vec<Value> = r
                .channels
                .iter()
                .map(|c| json!({"channelId": c.channel_id, "speaker": holder_json(c.holder.as_ref())}))
                .collect();
            let rows = items
                .iter()
                .map(|c| {
                    vec![
                        c["channelId"].as_str().unwrap_or_default().to_owned(),
                        speaker_cell(&c["speaker"]),
                    ]
                })
                .collect::<Vec<_>>();
            (
                json!({"eventId": r.event_id, "channels": items}),
                table(&["CHANNEL", "SPEAKER"], &rows),
            )
        }
        Command::Pause { event } => {
            let r = admin
                .pause_event(spb::GetEventRequest {
                    event_id: event.clone(),
                })
                .await?
                .into_inner();
            (
                json!({"releasedChannelIds": r.released_channel_ids}),
                format!("{event}: released {}", r.released_channel_ids.join(", ")),
            )
        }
        Command::History {
            channel,
            user,
            hours,
            limit,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis();
            let now = i64::try_from(now)?;
            let r = admin
                .talk_history(apb::TalkHistoryRequest {
                    channel_id: channel.clone().unwrap_or_default(),
                    user_id: user.clone().unwrap_or_default(),
                    from_ms: now - hours.clamp(&1, &8_760) * 3_600_000,
                    to_ms: now + 1,
                    limit: *limit,
                })
                .await?
                .into_inner();
            let items: Vec<Value> = r
                .records
                .iter()
                .map(|t| {
                    json!({"channelId": t.channel_id, "event": t.event, "userId": t.user_id,
                           "sessionId": t.session_id, "epoch": t.epoch, "atMs": t.at_ms,
                           "heldMs": t.held_ms, "by": t.by})
                })
                .collect();
            let rows = r
                .records
                .iter()
                .map(|t| {
                    vec![
                        t.at_ms.to_string(),
                        t.channel_id.clone(),
                        t.event.clone(),
                        t.user_id.clone(),
                        if t.held_ms > 0 {
                            format!("{:.1} s", t.held_ms as f64 / 1000.0)
                        } else {
                            String::new()
                        },
                        t.by.clone(),
                    ]
                })
                .collect::<Vec<_>>();
            (
                json!({"records": items}),
                table(
                    &["AT MS", "CHANNEL", "EVENT", "USER", "HELD", "CUT IN BY"],
                    &rows,
                ),
            )
        }
        Command::SyncHistory { session } => {
            let r = admin
                .sync_history(apb::SyncHistoryRequest {
                    session_id: session.clone(),
                    limit: 0,
                })
                .await?
                .into_inner();
            let items: Vec<Value> = r
                .records
                .iter()
                .map(|c| json!({"version": c.version, "action": c.action, "atMs": c.at_ms, "status": c.status}))
                .collect();
            let rows = r
                .records
                .iter()
                .map(|c| {
                    vec![
                        c.version.to_string(),
                        c.action.clone(),
                        c.status.clone(),
                        c.at_ms.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            (
                json!({"records": items}),
                table(&["VERSION", "ACTION", "STATUS", "AT MS"], &rows),
            )
        }
        Command::StopEmergency { event } => {
            let r = admin
                .stop_emergency(apb::StopEmergencyRequest {
                    event_id: event.clone(),
                })
                .await?
                .into_inner();
            let channels: Vec<&str> = r.channels.iter().map(|c| c.channel_id.as_str()).collect();
            (
                json!({"eventId": r.event_id, "channelIds": channels}),
                format!("{event}: emergency ended in {}", channels.join(", ")),
            )
        }
        Command::DevCerts { .. } => unreachable!("answered before connecting"),
    })
}

fn grants_output(g: &spb::UserGrants) -> (Value, String) {
    let rows = g
        .grants
        .iter()
        .map(|g| vec![g.channel_id.clone(), role_name(g.role).to_owned()])
        .collect::<Vec<_>>();
    (
        grants_json(g),
        format!(
            "{} (version {})\n{}",
            g.user_id,
            g.version,
            table(&["CHANNEL", "ROLE"], &rows)
        ),
    )
}

fn event_output(e: &spb::Event) -> (Value, String) {
    let emergency = e
        .emergency
        .as_ref()
        .and_then(|m| m.by.as_ref())
        .map_or_else(|| "none".to_owned(), |s| format!("by {}", s.user_name));
    (
        event_json(e),
        format!(
            "event {}\nchannels: {}\nemergency: {emergency}",
            e.event_id,
            e.channel_ids.join(", ")
        ),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok((doc, text)) => {
            if cli.json {
                println!("{doc}");
            } else {
                println!("{text}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("pttctl: {:?}: {}", status.code(), status.message()),
                None => eprintln!("pttctl: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_roles_parse() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
        assert!(parse_role("god").is_err());
        assert_eq!(
            role_name(parse_role("dispatch").unwrap().into()),
            "dispatch"
        );
    }
}
