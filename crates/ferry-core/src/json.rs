//! Strict JSON parsing and the canonical encoding that revision ids hash.
//!
//! Documents arrive as bytes from the network or the application. They are parsed here, once,
//! with the checks a sync engine needs: duplicate keys are rejected (two replicas could otherwise
//! disagree on which value a document holds), and nesting depth is bounded (a deeply nested
//! body would otherwise exhaust the stack of every replica it reaches).
//!
//! The canonical encoding sorts object keys by their UTF-8 bytes and writes no whitespace. It is
//! written out explicitly rather than relying on `serde_json::Value`'s map order, because any
//! crate in the dependency graph enabling serde_json's `preserve_order` feature would silently
//! change that order and with it every revision id.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// serde_json refuses to nest deeper than this on its own; our limit can only be lower.
pub const PARSER_HARD_DEPTH_LIMIT: usize = 127;

/// Why a JSON text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The text is not JSON, or has trailing characters.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// An object has the same key twice.
    #[error("duplicate key {0:?} in JSON object")]
    DuplicateKey(String),
    /// Objects and arrays are nested deeper than allowed.
    #[error("JSON nesting deeper than {0} levels")]
    TooDeep(usize),
    /// The text holds more values (scalars, arrays and objects) than allowed: each costs
    /// memory well beyond its bytes of text, so a request of many tiny values is bounded by
    /// their count.
    #[error("more than {0} JSON values in one request; send fewer documents at once")]
    TooManyValues(usize),
    /// A document body must be a JSON object.
    #[error("a document must be a JSON object")]
    NotAnObject,
    /// An integer outside the 64-bit range (JSON numbers are kept as 64-bit integers or
    /// doubles; a larger integer would silently lose digits).
    #[error(
        "the integer {0} is outside the range kept exactly (-2^63 to 2^64 - 1): send it as a string, or as a number with a fraction or an exponent to store it as a double"
    )]
    IntegerOutOfRange(String),
}

/// Parses `text` as JSON, refusing duplicate keys, nesting deeper than `max_depth`, and
/// integers outside the 64-bit range.
///
/// Depth counts containers: `{}` has depth 1, `{"a":[1]}` has depth 2. Integers (numbers
/// written without a fraction or an exponent) are kept exactly from -2^63 to 2^64 - 1; any
/// other number is a double, as in JavaScript.
///
/// ```
/// use ferry_core::json::{parse_strict, JsonError};
/// assert!(parse_strict(br#"{"a":{"b":1}}"#, 2).is_ok());
/// assert_eq!(parse_strict(br#"{"a":{"b":1}}"#, 1), Err(JsonError::TooDeep(1)));
/// assert!(matches!(parse_strict(br#"{"a":1,"a":2}"#, 8), Err(JsonError::DuplicateKey(_))));
/// assert!(matches!(
///     parse_strict(br#"{"n":123456789012345678901234567890}"#, 8),
///     Err(JsonError::IntegerOutOfRange(_))
/// ));
/// assert!(parse_strict(br#"{"n":1.2345678901234568e29}"#, 8).is_ok());
/// ```
pub fn parse_strict(text: &[u8], max_depth: usize) -> Result<Value, JsonError> {
    parse_within(text, max_depth, usize::MAX)
}

/// [`parse_strict`], refusing also a text of more than `max_values` values (every scalar,
/// array and object counts one), so the memory a parse takes is bounded by the count.
///
/// ```
/// use ferry_core::json::{parse_within, JsonError};
/// assert!(parse_within(b"[1,2]", 8, 3).is_ok());
/// assert_eq!(parse_within(b"[1,2,3]", 8, 3), Err(JsonError::TooManyValues(3)));
/// ```
pub fn parse_within(text: &[u8], max_depth: usize, max_values: usize) -> Result<Value, JsonError> {
    strictly(text, max_depth, max_values, |strict, deserializer| {
        strict.deserialize(deserializer)
    })
}

/// Runs `read` over `text` with a [`StrictValue`] holding the limits, then the checks that
/// follow any strict read: nothing after the value, no integer beyond 64 bits.
fn strictly<T>(
    text: &[u8],
    max_depth: usize,
    max_values: usize,
    read: impl FnOnce(
        StrictValue<'_>,
        &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
    ) -> Result<T, serde_json::Error>,
) -> Result<T, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let huge_double = Cell::new(false);
    let values_left = Cell::new(max_values);
    let strict = StrictValue {
        remaining_depth: max_depth,
        huge_double: &huge_double,
        values_left: &values_left,
    };
    let value =
        read(strict, &mut deserializer).map_err(|err| classify(err, max_depth, max_values))?;
    deserializer
        .end()
        .map_err(|err| JsonError::Syntax(err.to_string()))?;
    // serde_json reads an integer too large for 64 bits as a double without saying so, so
    // the text is scanned for one, but only when such a double was seen (almost never).
    if huge_double.get()
        && let Some(integer) = oversized_integer(text)
    {
        return Err(JsonError::IntegerOutOfRange(integer));
    }
    Ok(value)
}

/// Checks `text` as [`parse_within`] does (duplicate keys, depth, the count of values,
/// integers beyond 64 bits) without building it: for a text that is then read as typed
/// members and raw parts ([`RawJson`]), so that the limits hold for all of it at the cost of
/// a scan.
///
/// ```
/// use ferry_core::json::{check_within, JsonError};
/// assert!(check_within(br#"{"a":[1,2]}"#, 2, 4).is_ok());
/// assert_eq!(check_within(br#"{"a":[1,2]}"#, 1, 4), Err(JsonError::TooDeep(1)));
/// assert_eq!(check_within(br#"{"a":[1,2]}"#, 2, 3), Err(JsonError::TooManyValues(3)));
/// assert!(matches!(check_within(br#"{"a":1,"a":1}"#, 2, 4), Err(JsonError::DuplicateKey(_))));
/// ```
pub fn check_within(text: &[u8], max_depth: usize, max_values: usize) -> Result<(), JsonError> {
    strictly(text, max_depth, max_values, |strict, deserializer| {
        StrictCheck(strict).deserialize(deserializer)
    })
}

/// A JSON text carried as it is, not as a tree: a document inside a frame or an answer, read
/// and written as its bytes (a scan checks it is JSON), so moving it from the store to the
/// wire and on costs no parse and no re-serialisation. Equal when the texts are.
///
/// ```
/// use ferry_core::json::RawJson;
/// let raw = RawJson::from_text(r#"{"b":1,"a":2}"#.to_owned()).unwrap();
/// assert_eq!(raw.get(), r#"{"b":1,"a":2}"#);
/// assert_eq!(serde_json::to_string(&vec![raw]).unwrap(), r#"[{"b":1,"a":2}]"#);
/// assert!(RawJson::from_text("{".to_owned()).is_err());
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// `text` if it is one JSON value.
    pub fn from_text(text: String) -> Result<RawJson, JsonError> {
        RawValue::from_string(text)
            .map(RawJson)
            .map_err(|err| JsonError::Syntax(err.to_string()))
    }

    /// The canonical text of `map` (see [`canonical_object`]).
    pub fn canonical_object(map: &Map<String, Value>) -> RawJson {
        let text = String::from_utf8(canonical_object(map)).expect("JSON is UTF-8");
        RawJson::from_text(text).expect("serialized JSON is JSON")
    }

    /// `{}`, the body of most tombstones.
    pub fn empty_object() -> RawJson {
        RawJson::from_text("{}".to_owned()).expect("{} is JSON")
    }

    /// The text of a value that serializes.
    pub fn of(value: &impl Serialize) -> RawJson {
        RawJson(serde_json::value::to_raw_value(value).expect("the value serializes"))
    }

    /// The text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    /// Never: a JSON text has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.0.get().is_empty()
    }

    /// Parsed as an object, with the checks of [`parse_strict`].
    pub fn parse_object(&self, max_depth: usize) -> Result<Map<String, Value>, JsonError> {
        parse_object(self.get().as_bytes(), max_depth)
    }
}

/// What the document rule ([`crate::model::validate_document`]) needs to know of an
/// object: how deeply it nests and its first top-level key starting with `_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectShape {
    /// How deeply containers nest (`{}` is 1).
    pub depth: usize,
    /// The first top-level key that starts with `_` (after unescaping), if any.
    pub reserved_key: Option<String>,
}

impl ObjectShape {
    /// The shape of `map`.
    pub fn of_map(map: &Map<String, Value>) -> ObjectShape {
        ObjectShape {
            depth: 1 + map.values().map(depth_of).max().unwrap_or(0),
            reserved_key: map.keys().find(|key| key.starts_with('_')).cloned(),
        }
    }

    /// The shape of the object `text`, found by one pass over its bytes: the text is already
    /// known to be JSON, so nothing is built (a key is decoded only when it has escapes).
    ///
    /// ```
    /// use ferry_core::json::{ObjectShape, RawJson};
    /// let text = RawJson::from_text(r#"{"a":[{"_b":"]"}],"\u005fc":1}"#.to_owned()).unwrap();
    /// let shape = ObjectShape::of_text(&text).unwrap();
    /// assert_eq!(shape.depth, 3);
    /// assert_eq!(shape.reserved_key.as_deref(), Some("_c"));
    /// ```
    pub fn of_text(text: &RawJson) -> Result<ObjectShape, JsonError> {
        let text = text.get();
        let bytes = text.as_bytes();
        if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
            return Err(JsonError::NotAnObject);
        }
        let (mut depth, mut deepest) = (0usize, 0usize);
        let mut reserved_key = None;
        // Whether the next string is a key of the top-level object.
        let mut top_level_key = false;
        let mut index = 0;
        while index < bytes.len() {
            match bytes[index] {
                b'"' => {
                    let start = index;
                    let mut escaped = false;
                    index += 1;
                    while index < bytes.len() && bytes[index] != b'"' {
                        if bytes[index] == b'\\' {
                            escaped = true;
                            index += 1;
                        }
                        index += 1;
                    }
                    if top_level_key && reserved_key.is_none() {
                        let literal = text.get(start..=index).unwrap_or_default();
                        let key: Cow<'_, str> = if escaped {
                            Cow::Owned(serde_json::from_str(literal).unwrap_or_default())
                        } else {
                            Cow::Borrowed(literal.get(1..literal.len() - 1).unwrap_or_default())
                        };
                        if key.starts_with('_') {
                            reserved_key = Some(key.chars().take(80).collect());
                        }
                    }
                    top_level_key = false;
                }
                open @ (b'{' | b'[') => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    top_level_key = depth == 1 && open == b'{';
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b',' => top_level_key = depth == 1,
                _ => {}
            }
            index += 1;
        }
        Ok(ObjectShape {
            depth: deepest,
            reserved_key,
        })
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.get() == other.get()
    }
}

/// The first integer token of the JSON `text` (outside strings) that does not fit in 64
/// bits, truncated to 40 characters.
fn oversized_integer(text: &[u8]) -> Option<String> {
    let mut index = 0;
    while index < text.len() {
        match text[index] {
            b'"' => {
                index += 1;
                while index < text.len() && text[index] != b'"' {
                    index += if text[index] == b'\\' { 2 } else { 1 };
                }
                index += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = index;
                index += 1;
                while index < text.len() && text[index].is_ascii_digit() {
                    index += 1;
                }
                let is_integer = !matches!(text.get(index), Some(b'.' | b'e' | b'E'));
                while index < text.len()
                    && matches!(text[index], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    index += 1;
                }
                let token = std::str::from_utf8(&text[start..index]).unwrap_or_default();
                if is_integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                    return Some(token.chars().take(40).collect());
                }
            }
            _ => index += 1,
        }
    }
    None
}

/// Parses `text` as a JSON object (a document body), with the checks of [`parse_strict`].
pub fn parse_object(text: &[u8], max_depth: usize) -> Result<Map<String, Value>, JsonError> {
    match parse_strict(text, max_depth)? {
        Value::Object(map) => Ok(map),
        _ => Err(JsonError::NotAnObject),
    }
}

/// Checks an already parsed value against the depth limit (values built in code, not parsed).
pub fn check_depth(value: &Value, max_depth: usize) -> Result<(), JsonError> {
    if depth_of(value) > max_depth {
        Err(JsonError::TooDeep(max_depth))
    } else {
        Ok(())
    }
}

/// How deeply containers nest in `value` (a scalar has depth 0).
pub fn depth_of(value: &Value) -> usize {
    // Iterative, so that measuring a hostile value cannot overflow the stack.
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(depth + 1);
                stack.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(depth + 1);
                stack.extend(map.values().map(|item| (item, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Writes `value` in canonical form: keys sorted by UTF-8 bytes, no insignificant whitespace,
/// numbers and strings as serde_json writes them.
///
/// ```
/// use ferry_core::json::canonical;
/// let value = serde_json::json!({"b": 1, "a": [true, null, "x"]});
/// assert_eq!(canonical(&value), br#"{"a":[true,null,"x"],"b":1}"#);
/// ```
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

/// The canonical form of a document body (see [`canonical`]).
pub fn canonical_object(map: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical_object(map, &mut out);
    out
}

/// The length in bytes of the JSON encoding of `map` (the same for every key order), counted
/// without building the text.
///
/// ```
/// let body = serde_json::json!({"title": "milk", "n": 1});
/// let map = body.as_object().unwrap();
/// assert_eq!(ferry_core::json::encoded_len_object(map), ferry_core::json::canonical_object(map).len());
/// ```
pub fn encoded_len_object(map: &Map<String, Value>) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, map).expect("counting cannot fail");
    count.0
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => write_canonical_object(map, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => {
            // Writing a scalar into a Vec cannot fail.
            serde_json::to_writer(&mut *out, scalar).expect("scalar JSON serialization");
        }
    }
}

fn write_canonical_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
    out.push(b'{');
    for (index, (key, value)) in entries.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("string JSON serialization");
        out.push(b':');
        write_canonical(value, out);
    }
    out.push(b'}');
}

/// Applies a JSON merge patch (RFC 7396) to `target`: objects merge key by key, `null`
/// removes a key, anything else replaces the value.
///
/// ```
/// use ferry_core::json::merge_patch;
/// use serde_json::json;
/// let mut doc = json!({"title": "milk", "tags": ["a"], "meta": {"x": 1, "y": 2}});
/// merge_patch(&mut doc, &json!({"title": "oat milk", "meta": {"y": null}, "tags": ["b"]}));
/// assert_eq!(doc, json!({"title": "oat milk", "tags": ["b"], "meta": {"x": 1}}));
/// ```
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(fields) = target else {
        unreachable!("made an object above")
    };
    for (key, change) in changes {
        if change.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), change);
        }
    }
}

const DUPLICATE_MARKER: &str = "ferry: duplicate key ";
const DEPTH_MARKER: &str = "ferry: too deep";
const VALUES_MARKER: &str = "ferry: too many values";

fn classify(err: serde_json::Error, max_depth: usize, max_values: usize) -> JsonError {
    let message = err.to_string();
    if message.starts_with(VALUES_MARKER) {
        return JsonError::TooManyValues(max_values);
    }
    if let Some(rest) = message.strip_prefix(DUPLICATE_MARKER) {
        let key = rest.split(" at line ").next().unwrap_or(rest);
        return JsonError::DuplicateKey(key.to_owned());
    }
    if message.starts_with(DEPTH_MARKER) || message.starts_with("recursion limit exceeded") {
        return JsonError::TooDeep(max_depth.min(PARSER_HARD_DEPTH_LIMIT));
    }
    JsonError::Syntax(message)
}

/// Deserializes a `serde_json::Value` while tracking depth and refusing duplicate keys.
struct StrictValue<'a> {
    remaining_depth: usize,
    /// Set when a double with an integral value beyond 64 bits is read: it may have been
    /// written as an integer.
    huge_double: &'a Cell<bool>,
    /// How many more values may be read.
    values_left: &'a Cell<usize>,
}

impl<'a> StrictValue<'a> {
    fn nested<E: de::Error>(&self) -> Result<StrictValue<'a>, E> {
        if self.remaining_depth == 0 {
            return Err(E::custom(DEPTH_MARKER));
        }
        Ok(StrictValue {
            remaining_depth: self.remaining_depth - 1,
            ..*self
        })
    }
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        // Counted before the value is built, so a refused text never gets past the bound.
        match self.values_left.get().checked_sub(1) {
            Some(left) => self.values_left.set(left),
            None => return Err(de::Error::custom(VALUES_MARKER)),
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        // Integers from -2^63 + 1 to 2^64 - 1 arrive as integers; a double at or beyond
        // those bounds may be an integer just past them, rounded.
        const BELOW_I64: f64 = -9_223_372_036_854_775_808.0;
        const ABOVE_U64: f64 = 18_446_744_073_709_551_616.0;
        if value.fract() == 0.0 && (value <= BELOW_I64 || value >= ABOVE_U64) {
            self.huge_double.set(true);
        }
        serde_json::Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let child = self.nested()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue { ..child })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let child = self.nested()?;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE_MARKER}{key}")));
            }
            let value = access.next_value_seed(StrictValue { ..child })?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

/// [`StrictValue`]'s checks without building anything (keys read from the text are borrowed,
/// so most objects cost one small list of slices).
struct StrictCheck<'a>(StrictValue<'a>);

impl<'de> DeserializeSeed<'de> for StrictCheck<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.0.values_left.get().checked_sub(1) {
            Some(left) => self.0.values_left.set(left),
            None => return Err(de::Error::custom(VALUES_MARKER)),
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictCheck<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.0.visit_f64(value).map(drop)
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let child = self.0.nested()?;
        while seq
            .next_element_seed(StrictCheck(StrictValue { ..child }))?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        let child = self.0.nested()?;
        let mut keys = SeenKeys::default();
        while let Some(key) = access.next_key_seed(KeySeed)? {
            if keys.contains(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE_MARKER}{key}")));
            }
            access.next_value_seed(StrictCheck(StrictValue { ..child }))?;
            keys.push(key);
        }
        Ok(())
    }
}

/// The keys of one object seen so far: most objects have a few, kept without allocating.
#[derive(Default)]
struct SeenKeys<'de> {
    first: [Option<Cow<'de, str>>; SeenKeys::INLINE],
    count: usize,
    rest: Vec<Cow<'de, str>>,
}

impl<'de> SeenKeys<'de> {
    const INLINE: usize = 16;

    fn contains(&self, key: &str) -> bool {
        self.first[..self.count.min(SeenKeys::INLINE)]
            .iter()
            .any(|seen| seen.as_deref() == Some(key))
            || self.rest.iter().any(|seen| seen == key)
    }

    fn push(&mut self, key: Cow<'de, str>) {
        match self.first.get_mut(self.count) {
            Some(place) => *place = Some(key),
            None => self.rest.push(key),
        }
        self.count += 1;
    }
}

/// An object key, borrowed from the text unless it has escapes.
pub(crate) struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The byte scan finds the shape the parsed tree has: strings holding brackets, quotes
    /// and escapes do not fool it, nested `_` keys are not reserved, escaped top-level keys
    /// are read unescaped.
    #[test]
    fn an_object_shape_read_from_text_is_the_shape_of_its_tree() {
        let objects = [
            r#"{}"#,
            r#" { "a" : [ ] } "#,
            r#"{"a":"[{\"","b":{"c":[[1]]}}"#,
            r#"{"a":{"_b":1},"c":[{"_d":2}]}"#,
            r#"{"a":1,"_b":2,"_c":3}"#,
            r#"{"\u005fb":1}"#,
            r#"{"a\\":"_x","\"_y":1}"#,
            r#"{"a":[1,{"b":"}"}],"_z":[]}"#,
            r#"{"k\u00e9y":"\u00e9","x":{"y":{"z":{}}}}"#,
        ];
        for object in objects {
            let text = RawJson::from_text(object.to_owned()).unwrap();
            let map = text.parse_object(64).unwrap();
            assert_eq!(
                ObjectShape::of_text(&text).unwrap(),
                ObjectShape::of_map(&map),
                "{object}"
            );
        }
        let array = RawJson::from_text("[{}]".to_owned()).unwrap();
        assert_eq!(ObjectShape::of_text(&array), Err(JsonError::NotAnObject));
    }

    /// A duplicate key is found wherever it is: among the first keys an object keeps
    /// without allocating, past them, or across the two.
    #[test]
    fn duplicate_keys_are_found_in_objects_of_any_size() {
        let object = |keys: &[usize]| {
            let members: Vec<String> = keys.iter().map(|key| format!(r#""k{key}":1"#)).collect();
            format!("{{{}}}", members.join(","))
        };
        let distinct: Vec<usize> = (0..40).collect();
        assert_eq!(check_within(object(&distinct).as_bytes(), 4, 1_000), Ok(()));
        for (first, again) in [(3, 10), (3, 30), (20, 30), (15, 16)] {
            let mut keys: Vec<usize> = (0..again).collect();
            keys.push(first);
            let text = object(&keys);
            assert_eq!(
                check_within(text.as_bytes(), 4, 1_000),
                Err(JsonError::DuplicateKey(format!("k{first}"))),
                "{text}"
            );
        }
    }

    #[test]
    fn depth_limit_is_exact() {
        let at_limit = br#"{"a":{"b":{"c":1}}}"#;
        assert!(parse_strict(at_limit, 3).is_ok());
        assert_eq!(parse_strict(at_limit, 2), Err(JsonError::TooDeep(2)));
        assert_eq!(depth_of(&parse_strict(at_limit, 3).unwrap()), 3);
    }

    /// The scan the session runs over each frame refuses exactly what the parse refuses, with
    /// the same error (escaped keys, numbers past 64 bits and the value count included).
    #[test]
    fn checking_a_text_refuses_what_parsing_it_refuses() {
        let texts: &[&[u8]] = &[
            br#"{"a":{"b":[1,2,{"c":null}]}}"#,
            br#"{"a":1,"\u0061":2}"#,
            br#"{"x":{"k":1,"k":2}}"#,
            br#"{"k":1,"o":{"k":1}}"#,
            br#"{"n":123456789012345678901234567890}"#,
            br#"{"n":1.5e300,"s":"\"quoted\""}"#,
            br#"[[[[[[1]]]]]]"#,
            br#"{"a":1} x"#,
            br#"{"a":"#,
            b"",
        ];
        for text in texts {
            for (depth, values) in [(8, usize::MAX), (3, usize::MAX), (8, 4)] {
                assert_eq!(
                    check_within(text, depth, values),
                    parse_within(text, depth, values).map(drop),
                    "{}",
                    String::from_utf8_lossy(text)
                );
            }
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse_strict(br#"{"x":{"k":1,"k":2}}"#, 8),
            Err(JsonError::DuplicateKey("k".into()))
        );
    }

    #[test]
    fn trailing_garbage_and_non_objects_are_refused() {
        assert!(matches!(
            parse_strict(br#"{"a":1} x"#, 8),
            Err(JsonError::Syntax(_))
        ));
        assert_eq!(parse_object(b"[1]", 8), Err(JsonError::NotAnObject));
    }

    /// Found by the `protocol_frame` fuzz target: without exact float parsing, an 80-digit
    /// integer read, written and read again changed its last bits, so a number could change
    /// between two replicas and with it the revision id computed from the body.
    #[test]
    fn a_huge_number_keeps_its_value_through_text_round_trips() {
        let text = format!("{{\"n\": {}.5}}", "2".repeat(79));
        let value = parse_strict(text.as_bytes(), 8).unwrap();
        let again = parse_strict(value.to_string().as_bytes(), 8).unwrap();
        assert_eq!(again, value);
        assert_eq!(canonical(&again), canonical(&value));
    }

    /// serde_json reads an integer beyond 64 bits as the nearest double: stored, it would
    /// have lost its digits without a word (and replicas hash the changed body).
    #[test]
    fn integers_are_kept_exactly_to_64_bits_and_refused_beyond() {
        for (kept, value) in [
            ("18446744073709551615", json!(u64::MAX)),
            ("-9223372036854775808", json!(i64::MIN)),
            ("9007199254740993", json!(9_007_199_254_740_993_u64)),
        ] {
            let text = format!(r#"{{"n":{kept},"s":"12345678901234567890123"}}"#);
            assert_eq!(parse_strict(text.as_bytes(), 8).unwrap()["n"], value);
        }
        for refused in [
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "-123456789012345678901234567890",
        ] {
            // Digits in strings (after an escaped quote too) are not numbers.
            let text = format!(r#"{{"a":"x\"99999999999999999999999","b":[1.5e300,{refused}]}}"#);
            assert_eq!(
                parse_strict(text.as_bytes(), 8),
                Err(JsonError::IntegerOutOfRange(refused.to_owned())),
                "{refused}"
            );
        }
        // The same magnitudes written as doubles are doubles.
        for double in [
            "1.8446744073709552e19",
            "123456789012345678901234567890.0",
            "-1E30",
        ] {
            let text = format!(r#"{{"n":{double}}}"#);
            assert!(
                parse_strict(text.as_bytes(), 8).unwrap()["n"].is_f64(),
                "{double}"
            );
        }
    }

    #[test]
    fn canonical_ignores_key_order_and_whitespace() {
        let first = parse_strict(br#"{ "b" : [1, {"y":2,"x":1}], "a": "\u00e9" }"#, 8).unwrap();
        let second = parse_strict(br#"{"a":"\u00e9","b":[1,{"x":1,"y":2}]}"#, 8).unwrap();
        assert_eq!(canonical(&first), canonical(&second));
        assert_eq!(
            String::from_utf8(canonical(&first)).unwrap(),
            "{\"a\":\"é\",\"b\":[1,{\"x\":1,\"y\":2}]}"
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7396_examples() {
        // The test cases of RFC 7396, appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn depth_of_a_deep_value_does_not_recurse() {
        let mut value = json!(1);
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(depth_of(&value), 100_000);
        // Dropping a deeply nested serde_json value recurses; leak-free teardown is the
        // parser's job (it never builds one this deep), so unwind it here by hand.
        let mut current = value;
        while let Value::Array(mut items) = current {
            current = items.pop().unwrap_or(Value::Null);
        }
    }
}
