//! What cutoff reads of an HTTP/2 upstream's frames itself: the heads of all, the
//! payload of SETTINGS. hyper's client learns of the upstream's stream limit and of its
//! GOAWAY only when its connection task runs or ends (see `h2.rs` for why that is too
//! late), so the bytes hyper reads pass through [`FrameWatch`] on their way.

/// Frame types and the setting watched (RFC 9113, sections 6.5 and 6.8).
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// What a read brought of what the watch looks for.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Seen {
    pub goaway: bool,
    /// A whole SETTINGS frame (not an ACK) was read.
    pub settings: bool,
    /// The last `SETTINGS_MAX_CONCURRENT_STREAMS` among the reads.
    pub max_streams: Option<u32>,
}

/// Follows the frames in what a server sends: each is a 9-byte head (24-bit payload
/// length, type, flags, stream) and its payload, from the first byte on (a server's
/// preface is its SETTINGS frame). Only heads and SETTINGS payloads are looked at; the
/// rest is passed over, so the cost is per frame, not per byte.
///
/// The stream limit is read here, as the upstream sends it, because hyper's connection
/// reports it only when its own task happens to be polled: a call let through on a stale
/// limit is refused by the upstream (`REFUSED_STREAM`) or waits inside hyper, where it
/// can be neither cancelled unsent nor moved to a new connection.
#[derive(Default)]
pub(super) struct FrameWatch {
    head: [u8; 9],
    /// Bytes of the current head read so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a SETTINGS frame (not its ACK), read a setting at a time.
    settings: bool,
    setting: [u8; 6],
    setting_have: usize,
}

impl FrameWatch {
    /// Follows the frames through `bytes`, the next ones read.
    pub(super) fn read(&mut self, mut bytes: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                if self.settings {
                    self.settings_payload(&bytes[..n], &mut seen);
                    seen.settings |= self.left == 0;
                }
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.head.len() - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.head.len() {
                let [a, b, c, kind, flags, ..] = self.head;
                self.left = u32::from_be_bytes([0, a, b, c]) as usize;
                self.have = 0;
                self.settings = kind == SETTINGS && flags & ACK == 0;
                self.setting_have = 0;
                seen.settings |= self.settings && self.left == 0;
                seen.goaway |= kind == GOAWAY;
            }
        }
        seen
    }

    fn settings_payload(&mut self, mut bytes: &[u8], seen: &mut Seen) {
        while !bytes.is_empty() {
            let n = (self.setting.len() - self.setting_have).min(bytes.len());
            self.setting[self.setting_have..self.setting_have + n].copy_from_slice(&bytes[..n]);
            self.setting_have += n;
            bytes = &bytes[n..];
            if self.setting_have == self.setting.len() {
                self.setting_have = 0;
                let [i0, i1, v0, v1, v2, v3] = self.setting;
                if u16::from_be_bytes([i0, i1]) == MAX_CONCURRENT_STREAMS {
                    seen.max_streams = Some(u32::from_be_bytes([v0, v1, v2, v3]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    fn setting(id: u16, value: u32) -> Vec<u8> {
        let mut s = id.to_be_bytes().to_vec();
        s.extend_from_slice(&value.to_be_bytes());
        s
    }

    /// A server's preface (SETTINGS with a stream limit of 7 among others), its ACK of
    /// ours, a DATA frame whose payload looks like a GOAWAY and a SETTINGS frame, a new
    /// limit of 2, then GOAWAY: whatever sizes the reads cut it into, the watch finds the
    /// limits and the GOAWAY where they are, and nothing in a DATA payload.
    #[test]
    fn the_watch_finds_limits_and_goaway_however_the_reads_cut_the_frames() {
        let mut stream = frame(
            SETTINGS,
            0,
            &[setting(0x4, 65_535), setting(0x3, 7)].concat(),
        );
        let first_limit_at = stream.len();
        stream.extend(frame(SETTINGS, ACK, &[]));
        let decoys = [
            frame(GOAWAY, 0, &[0; 8]),
            frame(SETTINGS, 0, &setting(0x3, 99)),
        ]
        .concat();
        stream.extend(frame(0x0, 0, &decoys));
        stream.extend(frame(SETTINGS, 0, &setting(0x3, 2)));
        let second_limit_at = stream.len();
        let goaway_at = stream.len();
        stream.extend(frame(GOAWAY, 0, &[0; 8]));
        for cut in 1..=stream.len() {
            let mut watch = FrameWatch::default();
            let (mut limit, mut goaway) = (None, None);
            for (i, read) in stream.chunks(cut).enumerate() {
                let end = i * cut + read.len();
                let seen = watch.read(read);
                limit = seen.max_streams.or(limit);
                // Each found in the read that completed it, never earlier.
                let expected = match end {
                    e if e < first_limit_at => None,
                    e if e < second_limit_at => Some(7),
                    _ => Some(2),
                };
                assert_eq!(limit, expected, "reads of {cut}, after {end} bytes");
                // The preface's SETTINGS complete at the first limit; the later
                // ones only in reads that also hold the earlier.
                if end >= first_limit_at && end - read.len() < first_limit_at {
                    assert!(seen.settings, "reads of {cut}: the preface not seen whole");
                }
                if end < first_limit_at {
                    assert!(!seen.settings, "reads of {cut}: SETTINGS seen too early");
                }
                if seen.goaway {
                    assert_eq!(goaway, None, "reads of {cut}: a second GOAWAY");
                    goaway = Some(end);
                }
            }
            let goaway = goaway.unwrap_or_else(|| panic!("reads of {cut}: no GOAWAY"));
            assert!(
                goaway >= goaway_at + 9 && goaway < goaway_at + 9 + cut,
                "reads of {cut}"
            );
        }
    }
}
