//! What Throng keeps in Redis: key names, the Lua scripts that change them atomically, and the parsing of
//! their answers. Plain data: no connection here.
//!
//! # Keys of a channel `c` (prefix `P`, default `throng`)
//! Every key of a channel carries the hash tag `{c}`, so in a Redis Cluster a channel's keys and its pub/sub
//! channel share one slot (one script touches them all) while channels spread over every slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{c}:m` | hash | `o`: the last offset, `e`: the epoch (16 hex digits); expires `META_TTL` after the last publish or subscribe |
//! | `P:{c}:s` | stream | history: entry id `<offset>-0`, fields `d` (data) and `t` (ms); `MAXLEN` history_size, expires history_ttl after the last publish |
//! | `P:{c}:p` | hash | presence: field `<node> <user>` -> that node's connections of the user |
//! | `P:{c}:z` | sorted set | presence liveness: node -> the time (ms) its entries expire unless refreshed |
//! | `P:{c}` | pub/sub channel (sharded in a Cluster) | `<offset>:<epoch>:<data>` for every publish |
//! | `P:ctl` | pub/sub channel | requests for every node: `d <node> <code> <user> <reason>` (disconnect a user) |

use bytes::Bytes;
use redis::Value;

/// How long a channel's offset and epoch outlive its last publish or subscribe: a channel unused for a
/// day starts again with a new epoch (as a node forgets an idle channel).
pub const META_TTL_SECS: u64 = 24 * 3600;

/// `PUBLISH`: next offset, history append (bounded, expiring), pub/sub publish, in one atomic step.
/// KEYS: meta, stream. ARGV: pub/sub channel, data, history size, history ttl (s), meta ttl (s), the epoch to
/// use if the channel has none, the publish command (`PUBLISH` or, in a Cluster, `SPUBLISH`).
pub const PUBLISH: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', e)
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
local n = tonumber(ARGV[3])
if n > 0 then
  local t = redis.call('TIME')
  local ms = t[1] * 1000 + math.floor(t[2] / 1000)
  local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', n, o .. '-0', 'd', ARGV[2], 't', ms)
  if type(ok) == 'table' and ok.err then
    -- A stream left from an earlier epoch (its meta was lost): history starts again.
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', n, o .. '-0', 'd', ARGV[2], 't', ms)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call(ARGV[7], ARGV[1], o .. ':' .. e .. ':' .. ARGV[2])
return {o, e}
";

/// `POSITION`: the channel's offset and epoch (created with the proposed epoch when it has none), and the
/// history after an offset. KEYS: meta, stream. ARGV: proposed epoch, meta ttl (s), from (-1: no history
/// wanted), most entries. Returns `{offset, epoch, now_ms, entries}`.
pub const POSITION: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local from = tonumber(ARGV[3])
local entries = {}
if from >= 0 and from < o then
  entries = redis.call('XRANGE', KEYS[2], (from + 1) .. '-0', '+', 'COUNT', ARGV[4])
end
local t = redis.call('TIME')
return {o, e, t[1] * 1000 + math.floor(t[2] / 1000), entries}
";

/// `HISTORY`: the newest entries (after an offset, when given), newest first; nothing is created.
/// KEYS: meta, stream. ARGV: after (-1: from the start), most entries. Returns `{offset, epoch, now_ms,
/// entries}` (offset 0 and epoch "" for a channel Redis does not know).
pub const HISTORY: &str = r"
local e = redis.call('HGET', KEYS[1], 'e') or ''
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local after = tonumber(ARGV[1])
local lo = '-'
if after >= 0 then lo = (after + 1) .. '-0' end
local entries = {}
if o > after then entries = redis.call('XREVRANGE', KEYS[2], '+', lo, 'COUNT', ARGV[2]) end
local t = redis.call('TIME')
return {o, e, t[1] * 1000 + math.floor(t[2] / 1000), entries}
";

/// `PRESENCE_SET`: this node's connection counts of some users (0 removes the user), and the node's
/// liveness. KEYS: presence hash, liveness set. ARGV: node, ttl (ms), then user/count pairs.
pub const PRESENCE_SET: &str = r"
for i = 3, #ARGV, 2 do
  local f = ARGV[1] .. ' ' .. ARGV[i]
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  else
    redis.call('HDEL', KEYS[1], f)
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
";

/// `PRESENCE_GET`: forgets the entries of nodes whose liveness expired, then returns every entry (flat
/// field/count list). KEYS: presence hash, liveness set.
pub const PRESENCE_GET: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, node in ipairs(dead) do
  local cursor = '0'
  repeat
    local r = redis.call('HSCAN', KEYS[1], cursor, 'MATCH', node .. ' *', 'COUNT', 1000)
    cursor = r[1]
    for i = 1, #r[2], 2 do redis.call('HDEL', KEYS[1], r[2][i]) end
  until cursor == '0'
  redis.call('ZREM', KEYS[2], node)
end
return redis.call('HGETALL', KEYS[1])
";

/// The scripts, loaded on every connection (and on every master of a Cluster).
pub const ALL: [&str; 5] = [PUBLISH, POSITION, HISTORY, PRESENCE_SET, PRESENCE_GET];

/// The key names of one channel.
#[derive(Debug)]
pub struct Keys {
    /// Offset and epoch.
    pub meta: String,
    /// History.
    pub stream: String,
    /// Presence entries.
    pub presence: String,
    /// Presence liveness.
    pub live: String,
    /// The pub/sub channel.
    pub pubsub: String,
}

impl Keys {
    /// The keys of `channel` under `prefix`.
    pub fn of(prefix: &str, channel: &str) -> Self {
        Self {
            meta: format!("{prefix}:{{{channel}}}:m"),
            stream: format!("{prefix}:{{{channel}}}:s"),
            presence: format!("{prefix}:{{{channel}}}:p"),
            live: format!("{prefix}:{{{channel}}}:z"),
            pubsub: pubsub_name(prefix, channel),
        }
    }
}

/// The pub/sub channel of `channel`.
pub fn pubsub_name(prefix: &str, channel: &str) -> String {
    format!("{prefix}:{{{channel}}}")
}

/// The control channel every node subscribes to.
pub fn control_name(prefix: &str) -> String {
    format!("{prefix}:ctl")
}

/// The Throng channel a pub/sub channel name carries (`P:{c}` -> `c`), if it is one.
pub fn channel_of<'a>(prefix: &str, pubsub: &'a [u8]) -> Option<&'a str> {
    let rest = pubsub.strip_prefix(prefix.as_bytes())?.strip_prefix(b":{")?.strip_suffix(b"}")?;
    std::str::from_utf8(rest).ok()
}

/// The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the part between the first `{` and
/// the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

/// CRC16-CCITT in its XMODEM form (polynomial 0x1021, initial value 0), as Redis Cluster uses.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A message as pub/sub carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Its offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: u64,
    /// The raw JSON data.
    pub data: Bytes,
}

/// Parses `<offset>:<epoch>:<data>`.
pub fn parse_pushed(payload: Bytes) -> Option<Pushed> {
    let c1 = payload.iter().position(|&b| b == b':')?;
    let offset = std::str::from_utf8(&payload[..c1]).ok()?.parse().ok()?;
    let rest = &payload[c1 + 1..];
    let c2 = rest.iter().position(|&b| b == b':')?;
    let epoch = parse_epoch(&rest[..c2])?;
    let data = payload.slice(c1 + 1 + c2 + 1..);
    Some(Pushed { offset, epoch, data })
}

/// An epoch as stored: 16 hex digits.
pub fn parse_epoch(b: &[u8]) -> Option<u64> {
    (b.len() == 16).then_some(())?;
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

/// One history entry read from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its offset (the entry id's first part).
    pub offset: u64,
    /// When it was published (ms, Redis's clock).
    pub at_ms: u64,
    /// The raw JSON data.
    pub data: Bytes,
}

/// What `POSITION` and `HISTORY` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// The channel's last offset.
    pub offset: u64,
    /// Its epoch (`None`: Redis does not know the channel; only `HISTORY` answers so).
    pub epoch: Option<u64>,
    /// Redis's clock (ms), for the history age bound.
    pub now_ms: u64,
    /// Entries, in the order the script returned them.
    pub entries: Vec<Entry>,
}

/// Why an answer could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unexpected answer from Redis: {0}")]
pub struct BadAnswer(pub &'static str);

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The elements of an array (RESP2 array, RESP3 array or set).
pub fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// Parses `{offset, epoch, now_ms, entries}`.
pub fn parse_read(v: &Value) -> Result<Read, BadAnswer> {
    let a = array(v).filter(|a| a.len() == 4).ok_or(BadAnswer("a read is 4 values"))?;
    let offset = int(&a[0]).ok_or(BadAnswer("offset"))?;
    let epoch = match bytes(&a[1]) {
        Some([]) => None,
        Some(b) => Some(parse_epoch(b).ok_or(BadAnswer("epoch"))?),
        None => return Err(BadAnswer("epoch")),
    };
    let now_ms = int(&a[2]).ok_or(BadAnswer("time"))?;
    let mut entries = Vec::new();
    for e in array(&a[3]).ok_or(BadAnswer("entries"))? {
        let pair = array(e).filter(|p| p.len() == 2).ok_or(BadAnswer("entry"))?;
        let id = bytes(&pair[0]).ok_or(BadAnswer("entry id"))?;
        let dash = id.iter().position(|&b| b == b'-').ok_or(BadAnswer("entry id"))?;
        let offset = std::str::from_utf8(&id[..dash]).ok().and_then(|s| s.parse().ok()).ok_or(BadAnswer("id"))?;
        let fields = array(&pair[1]).ok_or(BadAnswer("entry fields"))?;
        let (mut data, mut at_ms) = (None, 0);
        for kv in fields.chunks(2) {
            match (kv.first().and_then(bytes), kv.get(1)) {
                (Some(b"d"), Some(v)) => data = bytes(v).map(Bytes::copy_from_slice),
                (Some(b"t"), Some(v)) => at_ms = int(v).unwrap_or(0),
                _ => {}
            }
        }
        entries.push(Entry { offset, at_ms, data: data.ok_or(BadAnswer("entry data"))? });
    }
    Ok(Read { offset, epoch, now_ms, entries })
}

/// Parses `{offset, epoch}` (the answer of `PUBLISH`).
pub fn parse_published(v: &Value) -> Result<(u64, u64), BadAnswer> {
    let a = array(v).filter(|a| a.len() == 2).ok_or(BadAnswer("a publish answer is 2 values"))?;
    let offset = int(&a[0]).ok_or(BadAnswer("offset"))?;
    let epoch = bytes(&a[1]).and_then(parse_epoch).ok_or(BadAnswer("epoch"))?;
    Ok((offset, epoch))
}

/// Sums the `PRESENCE_GET` answer per user: (user, connections), in name order.
pub fn parse_presence(v: &Value) -> Result<Vec<(String, u32)>, BadAnswer> {
    let mut users = std::collections::BTreeMap::<String, u32>::new();
    let mut add = |field: &Value, count: &Value| -> Result<(), BadAnswer> {
        let f = bytes(field).ok_or(BadAnswer("presence field"))?;
        let n = int(count).ok_or(BadAnswer("presence count"))?;
        let user = f.iter().position(|&b| b == b' ').map(|sp| &f[sp + 1..]).ok_or(BadAnswer("presence field"))?;
        let user = String::from_utf8_lossy(user).into_owned();
        *users.entry(user).or_default() += u32::try_from(n).unwrap_or(u32::MAX);
        Ok(())
    };
    match v {
        Value::Map(m) => {
            for (f, n) in m {
                add(f, n)?;
            }
        }
        other => {
            for kv in array(other).ok_or(BadAnswer("presence list"))?.chunks(2) {
                if let [f, n] = kv {
                    add(f, n)?;
                }
            }
        }
    }
    Ok(users.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        let k = Keys::of("throng", "room:1");
        let s = slot(k.pubsub.as_bytes());
        assert!([&k.meta, &k.stream, &k.presence, &k.live].iter().all(|key| slot(key.as_bytes()) == s));
        assert_eq!(slot(b"throng:{room:1}:m"), slot(b"room:1"));
    }

    #[test]
    fn names_round_trip() {
        let k = Keys::of("p", "chat:a");
        assert_eq!(k.pubsub, "p:{chat:a}");
        assert_eq!(channel_of("p", k.pubsub.as_bytes()), Some("chat:a"));
        assert_eq!(channel_of("p", b"q:{chat:a}"), None);
        assert_eq!(channel_of("p", b"p:ctl"), None);
    }

    #[test]
    fn pushed_messages_parse() {
        let p = parse_pushed(Bytes::from_static(b"42:00000000000000e1:{\"a\":\"x:y\"}")).unwrap();
        assert_eq!((p.offset, p.epoch, &p.data[..]), (42, 0xe1, &b"{\"a\":\"x:y\"}"[..]));
        assert!(parse_pushed(Bytes::from_static(b"x:00000000000000e1:1")).is_none());
        assert!(parse_pushed(Bytes::from_static(b"1:e1:1")).is_none());
        assert!(parse_pushed(Bytes::from_static(b"1")).is_none());
    }

    #[test]
    fn reads_parse() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, d: &str, t: i64| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk("d"), bulk(d), bulk("t"), Value::Int(t)])])
        };
        let v = Value::Array(vec![
            Value::Int(7),
            bulk("00000000000000ff"),
            Value::Int(1000),
            Value::Array(vec![entry("6-0", "1", 900), entry("7-0", "2", 950)]),
        ]);
        let r = parse_read(&v).unwrap();
        assert_eq!((r.offset, r.epoch, r.now_ms), (7, Some(255), 1000));
        assert_eq!(r.entries.iter().map(|e| (e.offset, e.at_ms)).collect::<Vec<_>>(), [(6, 900), (7, 950)]);
        let unknown = Value::Array(vec![Value::Int(0), bulk(""), Value::Int(1), Value::Array(vec![])]);
        assert_eq!(parse_read(&unknown).unwrap().epoch, None);
        assert!(parse_read(&Value::Int(1)).is_err());
        let p = Value::Array(vec![bulk("n1 alice"), bulk("2"), bulk("n2 alice"), bulk("1"), bulk("n2 bob"), bulk("1")]);
        assert_eq!(parse_presence(&p).unwrap(), [("alice".to_string(), 3), ("bob".to_string(), 1)]);
        let pub_ok = Value::Array(vec![Value::Int(3), bulk("0000000000000001")]);
        assert_eq!(parse_published(&pub_ok).unwrap(), (3, 1));
    }
}
