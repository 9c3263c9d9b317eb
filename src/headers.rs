//! Header and URI rewriting between client and upstream.
//!
//! Hop-by-hop headers (RFC 9110 section 7.6.1: `Connection` and every header it names,
//! plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`) describe one
//! connection, so they are dropped in both directions; hyper frames each side's body
//! itself. `TE: trailers` is kept because gRPC needs it end to end. The client's address
//! is appended to `X-Forwarded-For`; `X-Forwarded-Proto` and `X-Forwarded-Host` say what
//! the client asked for, and `Host` becomes the upstream's unless the route preserves it.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Uri, request};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Named once: a lookup by `&str` parses the name again on every request.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// What the proxy knows of the client's connection.
pub struct ClientInfo {
    /// The client's IP, formatted once per connection.
    pub ip: HeaderValue,
    pub tls: bool,
}

impl ClientInfo {
    pub fn new(ip: IpAddr, tls: bool) -> ClientInfo {
        ClientInfo {
            ip: ip_value(ip),
            tls,
        }
    }
}

/// An address as a header value. IPv4 by hand: `Display` went through the formatting
/// machinery and a `String`, about 1 300 instructions, for every new connection.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    };
    let mut text = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            text[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            text[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&text[..n]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Removes the hop-by-hop headers of one connection.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the names first: most messages carry none of these, or only
    // `Connection`, and every lookup or removal by name costs a hash.
    let (mut connection, mut te, mut others, mut transfer_encoding) = (false, false, false, false);
    for name in headers.keys() {
        // By length first: one compare rules out nearly every name a message carries,
        // where matching each against all seven names cost ~60 instructions per header.
        if !matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17 | 18) {
            continue;
        }
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::TE {
            te = true;
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            others = true;
        } else if name == header::UPGRADE
            || name == header::PROXY_AUTHENTICATE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
        {
            others = true;
        }
    }
    if connection {
        // Exact bytes first: nearly every peer writes these in lower case, and the compare
        // that ignores case goes byte by byte (about 80 instructions for `keep-alive`).
        let usual = |t: &[u8]| {
            t == b"keep-alive"
                || t == b"close"
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"close")
        };
        // `Connection: keep-alive` or `close`, nearly always: neither names a header that
        // is not removed below anyway, and an empty list allocates nothing. The usual line
        // is matched whole, before any splitting: about 200 instructions of `to_str`,
        // `split` and `trim` spared on a `Connection: close` request.
        let mut named: Vec<HeaderName> = Vec::new();
        let mut names_in = |line: HeaderValue| {
            if usual(line.as_bytes().trim_ascii()) {
                return;
            }
            let Ok(line) = line.to_str() else { return };
            named.extend(
                line.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && !usual(t.as_bytes()))
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
            );
        };
        if headers.len() == headers.keys_len() {
            // No name repeats, so `Connection` is one line: a plain removal, about 150
            // instructions fewer than the entry's with all its lines.
            if let Some(line) = headers.remove(header::CONNECTION) {
                names_in(line);
            }
        } else if let header::Entry::Occupied(e) = headers.entry(header::CONNECTION) {
            // Taken out with all its lines in one lookup.
            e.remove_entry_mult().1.for_each(names_in);
        }
        for name in named {
            if name == header::TE {
                te = true;
                if keep_te_trailers {
                    continue;
                }
            }
            headers.remove(&name);
        }
    }
    if others {
        headers.remove(&KEEP_ALIVE);
        headers.remove(&PROXY_CONNECTION);
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::UPGRADE);
        headers.remove(header::PROXY_AUTHENTICATE);
    }
    if transfer_encoding {
        // RFC 9112, 6.3: Transfer-Encoding overrides Content-Length, and a message that
        // came with both must lose the latter before it is forwarded. Kept, it would frame
        // the body for the next hop differently from how it was read here: hyper would
        // cut a response to the stale length and keep the connection for the next one.
        headers.remove(header::CONTENT_LENGTH);
    }
    if te && let Some(v) = headers.get(header::TE) {
        let trailers_only = v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if keep_te_trailers && trailers_only {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// The `Host` the upstream gets (an HTTP/2 upstream as its `:authority`): the endpoint's,
/// replacing the client's in place, or, on a route that preserves it, the client's (the
/// endpoint's if the client sent none). Written at dispatch, once the endpoint is known.
pub fn set_host(headers: &mut HeaderMap, endpoint_host: &HeaderValue, preserve_host: bool) {
    if preserve_host {
        headers
            .entry(header::HOST)
            .or_insert_with(|| endpoint_host.clone());
    } else {
        headers.insert(header::HOST, endpoint_host.clone());
    }
}

/// More than one `Host` line: RFC 9112 (section 3.2) requires a 400, and which of them a
/// proxy, a cache and the upstream each believe is how Host confusion starts.
pub fn more_than_one_host(headers: &HeaderMap) -> bool {
    // As many lines as names (nearly every request) means no name repeats: two counters
    // compared, where a lookup costs about 170 instructions.
    if headers.len() == headers.keys_len() {
        return false;
    }
    let mut lines = headers.get_all(header::HOST).iter();
    lines.next().is_some() && lines.next().is_some()
}

/// Makes room in `headers` for `additional` more names, so that inserting them never
/// grows the map. A map hyper reuses on a kept-alive connection has the room already. On
/// a new connection hyper sizes the map to the headers it parsed, and growing it in place
/// cost about 1 600 instructions: jemalloc's slow path to reallocate the entries (it
/// cannot grow them in place across a size class), then a new index. Moving a small map's
/// few entries into a new one of the right size costs a fraction of that; a large map
/// grows in place, where the move would cost more.
fn make_room(headers: &mut HeaderMap, additional: usize) {
    let needed = headers.len() + additional;
    if needed <= headers.capacity() {
        return;
    }
    if headers.keys_len() > MOVE_AT_MOST {
        headers.reserve(additional);
        return;
    }
    let old = std::mem::replace(headers, HeaderMap::with_capacity(needed));
    let mut last: Option<HeaderName> = None;
    for (name, value) in old {
        // `None`: another value of the name before it, in order.
        if let Some(name) = name {
            last = Some(name);
        }
        if let Some(name) = &last {
            headers.append(name.clone(), value);
        }
    }
}

/// The most names [`make_room`] moves to a new map rather than growing the old one: each
/// costs a hash and an insert, about 80 instructions.
const MOVE_AT_MOST: usize = 12;

/// Rewrites a client request's head for the upstream: path, forwarding headers, and the
/// `Host` of a preserving route whose client named its authority in the URI only (every
/// other `Host` is [`set_host`]'s, at dispatch).
pub fn to_upstream(
    parts: &mut request::Parts,
    client: &ClientInfo,
    path_prefix: &str,
    strip_prefix: bool,
    preserve_host: bool,
) {
    // The client's `Host` stays where it is: the dispatch overwrites it in place with the
    // endpoint's unless the route preserves it ([`set_host`]). Taking it out here cost
    // about 200 instructions per request: a removal moves the map's last entry into the
    // gap and finds that entry's index again.
    let (host, sent) = match parts.headers.get(header::HOST) {
        Some(h) => (Some(h.clone()), true),
        // An absolute-form (or HTTP/2) request names its authority in the URI instead.
        None => (
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            false,
        ),
    };
    // Room, at once, for every write until the head goes out. `HeaderMap` grows a full map
    // on any insert or entry lookup, even of a name it has, so each write needs a free
    // slot when it is made: the three added below, the dispatch's `Host` (written or
    // overwritten), a route's `deadline_header`, and the authority's `Host` on a route that
    // preserves it. Made before the hop-by-hop headers go, since looking `Connection` up
    // by entry is such a write too.
    make_room(&mut parts.headers, 5 + usize::from(!sent && preserve_host));
    strip_hop_by_hop(&mut parts.headers, true);

    // One lookup for reading and writing; several `X-Forwarded-For` lines join into one.
    match parts.headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(client.ip.clone());
        }
        header::Entry::Occupied(mut e) => {
            let mut v = Vec::with_capacity(64);
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client.ip.as_bytes());
            e.insert(HeaderValue::from_bytes(&v).unwrap_or_else(|_| client.ip.clone()));
        }
    }
    parts.headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if client.tls { "https" } else { "http" }),
    );
    if let Some(h) = host {
        if preserve_host && !sent {
            parts.headers.insert(header::HOST, h.clone());
        }
        parts.headers.insert(X_FORWARDED_HOST.clone(), h);
    }

    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Each side's framing is its own: the upstream client decides HTTP/1.1 or HTTP/2.
    parts.version = http::Version::HTTP_11;
    parts.uri = if strip_prefix {
        Uri::from(strip(&pq, path_prefix))
    } else {
        Uri::from(pq)
    };
}

/// `/news/v2/x?q` with prefix `/news/` becomes `/v2/x?q`: the result always starts with `/`.
fn strip(pq: &PathAndQuery, prefix: &str) -> PathAndQuery {
    let path = pq.path();
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let mut s = String::with_capacity(pq.as_str().len() + 1);
    if !rest.starts_with('/') {
        s.push('/');
    }
    s.push_str(rest);
    if let Some(q) = pq.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s).unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

/// Prepends an upstream URL's path (`http://host/api` forwards `/x` as `/api/x`).
pub fn with_base_path(uri: &Uri, base: &str) -> Uri {
    if base.is_empty() {
        return uri.clone();
    }
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    PathAndQuery::try_from(format!("{base}{pq}"))
        .map(Uri::from)
        .unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.0.10",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut p = parts(
            "/x",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers, deflate"),
                ("upgrade", "h2c"),
                ("x-kept", "yes"),
                ("host", "example.com"),
            ],
        );
        let client = ClientInfo::new("10.1.2.3".parse().unwrap(), false);
        to_upstream(&mut p, &client, "/", false, false);
        let h = &p.headers;
        for gone in ["connection", "x-secret", "keep-alive", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone} should be gone");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    /// A map sized as hyper sizes it on a new connection (to the headers parsed) takes
    /// the rewrite, the endpoint's `Host` and a deadline header without growing again,
    /// whatever the client sent: with or without `Host` (an absolute-form URI instead),
    /// with or without a `Connection` line, few headers or many.
    #[test]
    fn the_rewrite_makes_room_once() {
        for preserve_host in [false, true] {
            for host in [true, false] {
                for connection in [true, false] {
                    for others in [0, 2, 8, 20] {
                        let mut names: Vec<(HeaderName, HeaderValue)> = (0..others)
                            .map(|i| {
                                let n = format!("x-client-{i}");
                                (
                                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                                    HeaderValue::from(i),
                                )
                            })
                            .collect();
                        if host {
                            names.push((header::HOST, HeaderValue::from_static("a.example")));
                        }
                        if connection {
                            names.push((header::CONNECTION, HeaderValue::from_static("close")));
                        }
                        let mut p = parts("http://a.example/x", &[]);
                        p.headers = HeaderMap::new();
                        p.headers.reserve(names.len());
                        for (k, v) in names {
                            p.headers.append(k, v);
                        }
                        let client = ClientInfo::new("10.0.0.9".parse().unwrap(), false);
                        to_upstream(&mut p, &client, "/", false, preserve_host);
                        let room = p.headers.capacity();
                        set_host(
                            &mut p.headers,
                            &HeaderValue::from_static("upstream.internal"),
                            preserve_host,
                        );
                        p.headers
                            .insert("x-request-timeout-ms", HeaderValue::from_static("100"));
                        assert_eq!(
                            p.headers.capacity(),
                            room,
                            "preserve_host {preserve_host}, host {host}, \
                             connection {connection}, {others} others"
                        );
                    }
                }
            }
        }
    }

    /// Whether it moves the entries to a new map or grows the old one, every line stays,
    /// in order, and the room asked for is there.
    #[test]
    fn making_room_keeps_every_line_in_order() {
        for names in [3, MOVE_AT_MOST + 4] {
            let mut h = HeaderMap::new();
            h.reserve(names + 1);
            for i in 0..names {
                let name = HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
                h.append(name, HeaderValue::from(i));
            }
            h.append("x-h1", HeaderValue::from_static("again"));
            let before: Vec<(String, String)> = h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            make_room(&mut h, 4);
            assert!(h.capacity() >= h.len() + 4, "{names} names");
            let after: Vec<(String, String)> = h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            assert_eq!(after, before, "{names} names");
        }
    }

    /// `Connection` on one line or on several (where another name repeats too, or
    /// `Connection` itself does), in any case: every header it names goes, and so does it.
    #[test]
    fn every_connection_line_names_what_goes() {
        let cases: [&[(&str, &str)]; 4] = [
            &[
                ("connection", "Keep-Alive, x-a"),
                ("x-a", "1"),
                ("x-kept", "k"),
            ],
            &[
                ("connection", "x-a"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("x-a", "1"),
            ],
            &[
                ("connection", "x-a"),
                ("connection", "CLOSE, x-b"),
                ("x-a", "1"),
                ("x-b", "2"),
            ],
            &[("connection", "close"), ("x-kept", "k")],
        ];
        for headers in cases {
            let mut p = parts("/x", headers);
            strip_hop_by_hop(&mut p.headers, false);
            let left: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
            assert!(
                left.iter()
                    .all(|k| !matches!(*k, "connection" | "x-a" | "x-b")),
                "{headers:?} left {left:?}"
            );
            for (name, _) in headers {
                if matches!(*name, "x-kept" | "set-cookie") {
                    assert!(p.headers.contains_key(*name), "{headers:?}: {name} went");
                }
            }
        }
    }

    /// The endpoint's `Host` replaces the client's unless the route preserves it; a
    /// client that sent none gets the endpoint's either way.
    #[test]
    fn the_upstream_gets_one_host() {
        let endpoint = HeaderValue::from_static("upstream.internal");
        for (preserve_host, sent, expected) in [
            (false, Some("a.example"), "upstream.internal"),
            (true, Some("a.example"), "a.example"),
            (false, None, "upstream.internal"),
            (true, None, "upstream.internal"),
        ] {
            let mut p = parts("/x", &[("accept", "*/*")]);
            if let Some(h) = sent {
                p.headers.insert(header::HOST, HeaderValue::from_static(h));
            }
            let client = ClientInfo::new("10.0.0.9".parse().unwrap(), false);
            to_upstream(&mut p, &client, "/", false, preserve_host);
            set_host(&mut p.headers, &endpoint, preserve_host);
            let hosts: Vec<_> = p.headers.get_all(header::HOST).iter().collect();
            assert_eq!(
                hosts,
                [expected],
                "preserve_host = {preserve_host}, sent {sent:?}"
            );
            match sent {
                Some(h) => assert_eq!(p.headers["x-forwarded-host"], h),
                None => assert!(!p.headers.contains_key("x-forwarded-host")),
            }
        }
    }

    #[test]
    fn two_host_lines_are_told_apart_from_one() {
        let mut h = HeaderMap::new();
        assert!(!more_than_one_host(&h));
        h.append(header::HOST, HeaderValue::from_static("a.example"));
        assert!(!more_than_one_host(&h));
        h.append(header::HOST, HeaderValue::from_static("a.example"));
        assert!(more_than_one_host(&h));
    }

    #[test]
    fn appends_forwarded_for_and_preserves_host() {
        let mut p = parts(
            "/x",
            &[("x-forwarded-for", "1.1.1.1"), ("host", "a.example")],
        );
        let client = ClientInfo::new("10.0.0.9".parse().unwrap(), true);
        to_upstream(&mut p, &client, "/", false, true);
        assert_eq!(p.headers["x-forwarded-for"], "1.1.1.1, 10.0.0.9");
        assert_eq!(p.headers["host"], "a.example");
        assert_eq!(p.headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn joins_every_forwarded_for_line() {
        let mut p = parts(
            "/x",
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
            ],
        );
        let client = ClientInfo::new("10.0.0.9".parse().unwrap(), false);
        to_upstream(&mut p, &client, "/", false, false);
        let all: Vec<_> = p.headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.1.1.1, 2.2.2.2, 10.0.0.9"]);
    }

    /// Each name is matched by length first: a name whose length is missing from that list
    /// would slip through.
    #[test]
    fn removes_each_hop_by_hop_header() {
        for name in [
            "connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "keep-alive",
            "proxy-connection",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} was kept");
            // A Content-Length beside a Transfer-Encoding goes too (RFC 9112, 6.3).
            assert_eq!(
                h.contains_key(header::CONTENT_LENGTH),
                name != "transfer-encoding",
                "Content-Length beside {name}"
            );
        }
    }

    #[test]
    fn a_content_length_beside_a_transfer_encoding_is_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        // Also when `Connection` names it.
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("transfer-encoding"),
        );
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn strip_prefix_and_base_path() {
        let client = ClientInfo::new("127.0.0.1".parse().unwrap(), false);
        for (uri, prefix, want) in [
            ("/news/v2/top?x=1", "/news/", "/v2/top?x=1"),
            ("/news", "/news", "/"),
            ("/news/", "/news", "/"),
            ("/newsy", "/news", "/y"),
        ] {
            let mut p = parts(uri, &[]);
            to_upstream(&mut p, &client, prefix, true, false);
            assert_eq!(p.uri, want);
        }
        let u: Uri = "/v2/x?q=1".parse().unwrap();
        assert_eq!(with_base_path(&u, "/api"), "/api/v2/x?q=1");
    }
}
