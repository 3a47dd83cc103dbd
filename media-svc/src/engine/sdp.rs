//! SDP edits the engine needs: announcing a public IP in the node's candidates.

use std::net::IpAddr;

/// Replaces the bound address with `announced` in `c=` lines and candidate attributes.
pub fn announce_ip(sdp: &str, bound: IpAddr, announced: IpAddr) -> String {
    if bound == announced {
        return sdp.to_owned();
    }
    let bound = bound.to_string();
    let announced = announced.to_string();
    let mut out = String::with_capacity(sdp.len() + 16);
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("a=candidate:") {
            // candidate:<foundation> <component> <transport> <priority> <address> <port> ...
            let mut fields: Vec<&str> = line.split(' ').collect();
            if fields.len() > 5 && fields[4] == bound {
                fields[4] = &announced;
            }
            out.push_str(&fields.join(" "));
        } else if line.starts_with("c=IN ") && line.contains(&bound) {
            let family = if announced.contains(':') {
                "IP6"
            } else {
                "IP4"
            };
            let ending = if line.ends_with("\r\n") { "\r\n" } else { "\n" };
            out.push_str(&format!("c=IN {family} {announced}{ending}"));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The first `a=ice-ufrag` and `a=ice-pwd` values of an SDP.
pub fn ice_credentials(sdp: &str) -> Option<(String, String)> {
    let value = |name: &str| {
        sdp.lines()
            .find_map(|l| l.trim_end().strip_prefix(name).map(str::to_owned))
    };
    Some((value("a=ice-ufrag:")?, value("a=ice-pwd:")?))
}

/// True when the SDP carries at least one candidate.
pub fn has_candidate(sdp: &str) -> bool {
    sdp.lines().any(|l| l.starts_with("a=candidate:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_ip_replaces_the_bound_one() {
        let sdp = "v=0\r\nc=IN IP4 10.0.0.5\r\na=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n";
        let out = announce_ip(
            sdp,
            "10.0.0.5".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
        );
        assert_eq!(
            out,
            "v=0\r\nc=IN IP4 203.0.113.9\r\na=candidate:1 1 udp 2130706431 203.0.113.9 40000 typ host\r\n"
        );
        assert!(has_candidate(&out));
    }

    #[test]
    fn credentials_are_read_from_the_first_section() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n";
        assert_eq!(
            ice_credentials(sdp),
            Some(("abcd".into(), "0123456789012345678901".into()))
        );
        assert_eq!(ice_credentials("v=0\r\n"), None);
    }
}
