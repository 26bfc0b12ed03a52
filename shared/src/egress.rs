//! Where Meterline may send HTTP requests on a user's behalf (webhooks).
//!
//! A webhook URL is user input that makes a Meterline service open a
//! connection, so it could be aimed at the operator's own network: the
//! metadata service of a cloud VM, an admin port on localhost, a database in
//! a private subnet. [`Egress`] refuses loopback, private, link-local,
//! carrier-grade NAT, multicast, unspecified and other non-public addresses
//! unless an operator lists their network in an allow-list (CIDR, comma
//! separated, e.g. `127.0.0.0/8,::1/128` for local development).
//!
//! The entities service checks a URL when a webhook is written
//! ([`Egress::check_url`]: scheme, host, and the address when the host is
//! one); the notifier checks again when it sends, on the addresses the name
//! resolves to at that moment ([`Egress::resolve`]), so a name that later
//! points somewhere private is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ServiceError;

/// One network of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// `10.1.0.0/16`, `::1/128`, or a single address (`127.0.0.1`).
    pub fn parse(text: &str) -> Result<Network, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a network (address/prefix)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:127.0.0.1`) is the IPv4 one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Whether `ip` is anything but an ordinary public address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 can reach private IPv4
        }
    }
}

/// A URL's parts that matter for where it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// The host as written, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

/// The egress policy: public addresses, plus the allow-listed networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    allow: Vec<Network>,
}

impl Egress {
    /// From a comma-separated allow-list (empty: public addresses only).
    pub fn parse(allow: &str) -> Result<Egress, String> {
        let allow = allow
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Network::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Egress { allow })
    }

    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        !is_non_public(ip) || self.allow.iter().any(|n| n.contains(ip))
    }

    /// Checks what can be checked without a DNS lookup: an `http` or
    /// `https` URL with a host, no credentials in it, and, when the host is
    /// an address (or `localhost`), an address that is allowed.
    pub fn check_url(&self, url: &str) -> Result<Target, ServiceError> {
        let bad = |m: String| ServiceError::bad_request(format!("url {url:?}: {m}"));
        let uri: http::Uri = url
            .parse()
            .map_err(|e| bad(format!("not a valid URL ({e})")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("must start with http:// or https://".into())),
        };
        let authority = uri.authority().ok_or_else(|| bad("has no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry a user name or password".into()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("has no host".into()));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let literal: Option<IpAddr> = if host.eq_ignore_ascii_case("localhost")
            || host.to_ascii_lowercase().ends_with(".localhost")
        {
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        } else {
            host.parse().ok()
        };
        if let Some(ip) = literal {
            if !self.allows(ip) {
                return Err(refused(url, ip));
            }
        }
        Ok(Target { https, host, port })
    }

    /// Resolves `host` and keeps the allowed addresses; refuses the request
    /// if there are none (naming the first refused one).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ServiceError> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| ServiceError::unavailable(format!("cannot resolve {host}: {e}")))?
                .collect(),
        };
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.allows(a.ip()))
            .collect();
        if allowed.is_empty() {
            let ip = addrs
                .first()
                .map(|a| a.ip())
                .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
            return Err(refused(host, ip));
        }
        Ok(allowed)
    }
}

fn refused(what: &str, ip: IpAddr) -> ServiceError {
    ServiceError::bad_request(format!(
        "{what:?} points at {ip}, a loopback, private or otherwise non-public address; \
         webhooks may only reach it if the operator allows its network"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_refused_unless_allowed() {
        let strict = Egress::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://10.0.0.5/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:9000/",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.1.1/",
            "http://0.0.0.0/",
            "http://[fd00::1]/",
        ] {
            assert!(strict.check_url(url).is_err(), "{url} accepted");
        }
        let t = strict.check_url("https://hooks.example.com/x").unwrap();
        assert_eq!(
            (t.https, t.host.as_str(), t.port),
            (true, "hooks.example.com", 443)
        );
        strict.check_url("http://93.184.216.34:8080/").unwrap();
        for bad in [
            "ftp://x.example/",
            "hooks.example.com",
            "http://u:p@x.example/",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad} accepted");
        }

        let dev = Egress::parse("127.0.0.0/8, ::1/128").unwrap();
        dev.check_url("http://127.0.0.1:8080/hook").unwrap();
        dev.check_url("http://localhost:1/").unwrap();
        dev.check_url("http://[::1]:9000/").unwrap();
        assert!(dev.check_url("http://10.0.0.5/").is_err());
        assert!(Egress::parse("10.0.0.0/33").is_err());
        assert!(Egress::parse("nonsense").is_err());
    }

    #[tokio::test]
    async fn resolution_keeps_only_allowed_addresses() {
        let strict = Egress::default();
        assert!(strict.resolve("localhost", 80).await.is_err());
        let dev = Egress::parse("127.0.0.0/8,::1/128").unwrap();
        let addrs = dev.resolve("localhost", 80).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
