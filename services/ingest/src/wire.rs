//! The fast path of ingest: a well-formed measurement is read straight from
//! its JSON text, borrowing its strings, and written straight as
//! MessagePack, without a JSON tree, maps or a copy of each field.
//!
//! The bytes written are exactly those `rmp_serde::to_vec_named` makes of
//! the [`Measurement`] the measurement stands for (data fields in code
//! order, empty categories left out), so readers decode groups as
//! `Vec<Measurement>` whichever path a measurement took. A measurement that
//! does not fit this shape is not an error here: validation reads it again
//! as a tree to say precisely what is wrong with it.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use rmp::encode;
use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor,
};

use crate::model::Measurement;

/// A JSON string, borrowed from the request when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// The data fields of one category (`who`, `measure`, ...) as sent, sorted
/// by code. A code given twice in one object does not fit the fast path.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields<'a, V>(pub Vec<(Text<'a>, V)>);

impl<V> Default for Fields<'_, V> {
    fn default() -> Self {
        Fields(Vec::new())
    }
}

impl<'de: 'a, 'a, V: Deserialize<'de>> Deserialize<'de> for Fields<'a, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a, V>(PhantomData<(&'a (), V)>);
        impl<'de: 'a, 'a, V: Deserialize<'de>> Visitor<'de> for Visit<'a, V> {
            type Value = Fields<'a, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of data fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs: Vec<(Text<'a>, V)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry::<Text<'a>, V>()? {
                    pairs.push(pair);
                }
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
                    return Err(A::Error::custom("a data field given twice"));
                }
                Ok(Fields(pairs))
            }
        }
        d.deserialize_map(Visit(PhantomData))
    }
}

impl<V> Fields<'_, V> {
    pub fn codes(&self) -> impl Iterator<Item = &str> + Clone {
        self.0.iter().map(|(k, _)| k.0.as_ref())
    }
}

/// A well-formed measurement, borrowed from the request.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wire<'a> {
    #[serde(borrow, default)]
    pub uid: Option<Text<'a>>,
    #[serde(borrow)]
    pub meter: Text<'a>,
    #[serde(borrow)]
    pub account: Text<'a>,
    #[serde(borrow)]
    pub ts: Text<'a>,
    #[serde(borrow, default)]
    pub ets: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub who: Fields<'a, Text<'a>>,
    #[serde(borrow, default)]
    pub what: Fields<'a, Text<'a>>,
    #[serde(borrow, default, rename = "where")]
    pub where_: Fields<'a, Text<'a>>,
    #[serde(borrow, default)]
    pub other: Fields<'a, Text<'a>>,
    #[serde(borrow, default)]
    pub metadata: Fields<'a, Text<'a>>,
    #[serde(borrow, default)]
    pub measure: Fields<'a, f64>,
    #[serde(borrow, default)]
    pub cost: Fields<'a, f64>,
    #[serde(borrow, default)]
    pub income: Fields<'a, f64>,
}

impl<'a> Wire<'a> {
    /// Reads one measurement's JSON text; `None` if it does not fit the
    /// fast path.
    pub fn parse(json: &'a str) -> Option<Wire<'a>> {
        serde_json::from_str(json).ok()
    }

    /// The text categories in the order [`Measurement`] stores them.
    pub fn text_categories(&self) -> [(&'static str, &Fields<'a, Text<'a>>); 5] {
        [
            ("who", &self.who),
            ("what", &self.what),
            ("where", &self.where_),
            ("other", &self.other),
            ("metadata", &self.metadata),
        ]
    }

    /// The number categories in the order [`Measurement`] stores them.
    pub fn number_categories(&self) -> [(&'static str, &Fields<'a, f64>); 3] {
        [
            ("measure", &self.measure),
            ("cost", &self.cost),
            ("income", &self.income),
        ]
    }

    /// Every (category, code) of the measurement's data fields.
    pub fn field_codes(&self) -> impl Iterator<Item = (&'static str, &str)> + Clone {
        let text = self
            .text_categories()
            .into_iter()
            .flat_map(|(cat, f)| f.codes().map(move |c| (cat, c)));
        let numbers = self
            .number_categories()
            .into_iter()
            .flat_map(|(cat, f)| f.codes().map(move |c| (cat, c)));
        text.chain(numbers)
    }

    /// Appends the measurement to `out` as MessagePack, with `uid` (the
    /// caller's, or a generated one when `generated` is true).
    pub fn encode(&self, uid: &str, generated: bool, out: &mut Vec<u8>) {
        let texts = self.text_categories();
        let numbers = self.number_categories();
        let len = 4
            + usize::from(generated)
            + usize::from(self.ets.is_some())
            + texts.iter().filter(|(_, f)| !f.0.is_empty()).count()
            + numbers.iter().filter(|(_, f)| !f.0.is_empty()).count();
        // Writing to a Vec cannot fail.
        let _ = encode::write_map_len(out, len as u32);
        str_pair(out, "uid", uid);
        if generated {
            let _ = encode::write_str(out, "generatedUid");
            let _ = encode::write_bool(out, true);
        }
        str_pair(out, "meter", &self.meter.0);
        str_pair(out, "account", &self.account.0);
        str_pair(out, "ts", &self.ts.0);
        if let Some(ets) = &self.ets {
            str_pair(out, "ets", &ets.0);
        }
        for (cat, fields) in texts {
            if fields.0.is_empty() {
                continue;
            }
            let _ = encode::write_str(out, cat);
            let _ = encode::write_map_len(out, fields.0.len() as u32);
            for (code, value) in &fields.0 {
                str_pair(out, &code.0, &value.0);
            }
        }
        for (cat, fields) in numbers {
            if fields.0.is_empty() {
                continue;
            }
            let _ = encode::write_str(out, cat);
            let _ = encode::write_map_len(out, fields.0.len() as u32);
            for (code, value) in &fields.0 {
                let _ = encode::write_str(out, &code.0);
                let _ = encode::write_f64(out, *value);
            }
        }
    }
}

/// Reads a submit body, `{"measurements": [...]}`, handing each measurement
/// to `each` as soon as it is read, without keeping them: no array of
/// measurements is built, however many the request holds. Returns how many
/// were read, or `None` as soon as the body or a measurement does not fit
/// the fast path or `each` refuses one (then the request is read again,
/// measurement by measurement, to say what is wrong).
pub fn for_each_measurement<'de>(
    body: &'de [u8],
    each: impl FnMut(Wire<'de>) -> bool,
) -> Option<usize> {
    // UTF-8 is checked once for the whole body, not string by string.
    let body = std::str::from_utf8(body).ok()?;
    let mut de = serde_json::Deserializer::from_str(body);
    let n = de.deserialize_map(Body { each }).ok()?;
    de.end().ok()?;
    Some(n)
}

/// The body object: `measurements` and nothing else.
struct Body<F> {
    each: F,
}

impl<'de, F: FnMut(Wire<'de>) -> bool> Visitor<'de> for Body<F> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("{\"measurements\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut each = self.each;
        let mut read = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if key.0 != "measurements" || read.is_some() {
                return Err(A::Error::custom("not the fast path's body"));
            }
            read = Some(map.next_value_seed(Each(&mut each))?);
        }
        read.ok_or_else(|| A::Error::custom("measurements is missing"))
    }
}

/// The `measurements` array, read one element at a time.
struct Each<'f, F>(&'f mut F);

impl<'de, F: FnMut(Wire<'de>) -> bool> DeserializeSeed<'de> for Each<'_, F> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Wire<'de>) -> bool> Visitor<'de> for Each<'_, F> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of measurements")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<usize, S::Error> {
        let mut n = 0;
        while let Some(w) = seq.next_element::<Wire<'de>>()? {
            if !(self.0)(w) {
                return Err(S::Error::custom("measurement refused"));
            }
            n += 1;
        }
        Ok(n)
    }
}

fn str_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    let _ = encode::write_str(out, key);
    let _ = encode::write_str(out, value);
}

/// Appends a measurement read by the tree path to `out`, as [`Wire::encode`]
/// would have written it.
pub fn encode_measurement(
    m: &Measurement,
    out: &mut Vec<u8>,
) -> Result<(), rmp_serde::encode::Error> {
    rmp_serde::encode::write_named(out, m)
}

/// Appends the head of a `usage` group (its fields, then the length of its
/// `measurements` array), the same as `rmp_serde::to_vec_named` of a
/// [`crate::model::MeasurementGroup`]; the encoded measurements follow.
pub fn encode_group_head(
    out: &mut Vec<u8>,
    org: &str,
    meter: &str,
    meter_id: &str,
    received_at: &str,
    count: usize,
) {
    let _ = encode::write_map_len(out, 5);
    str_pair(out, "orgId", org);
    str_pair(out, "meter", meter);
    str_pair(out, "meterId", meter_id);
    str_pair(out, "receivedAt", received_at);
    let _ = encode::write_str(out, "measurements");
    let _ = encode::write_array_len(out, count as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MeasurementGroup;

    fn both_ways(json: &str, uid: &str, generated: bool) {
        let wire = Wire::parse(json).unwrap_or_else(|| panic!("fast path: {json}"));
        let mut fast = Vec::new();
        wire.encode(uid, generated, &mut fast);
        let mut tree: serde_json::Value = serde_json::from_str(json).unwrap();
        tree["uid"] = uid.into();
        let mut m: Measurement = serde_json::from_value(tree).unwrap();
        m.generated_uid = generated;
        assert_eq!(fast, rmp_serde::to_vec_named(&m).unwrap(), "{json}");
        let decoded: Measurement = rmp_serde::from_slice(&fast).unwrap();
        assert_eq!(decoded, m);
    }

    #[test]
    fn writes_what_serde_writes() {
        both_ways(
            r#"{"uid": "u1", "meter": "api", "account": "acme", "ts": "2024-05-01T10:00:00Z"}"#,
            "u1",
            false,
        );
        both_ways(
            r#"{"meter": "api", "account": "a\"c\u00e9me", "ts": "2024-05-01T10:00:00Z",
                "ets": "2024-05-01T11:00:00Z", "measure": {"z": 1, "a": 2.5, "m": -3e10},
                "who": {"user": "ann", "team": "t\n1"}, "where": {"region": "eu"},
                "what": {"x": ""}, "other": {"o": "o"}, "metadata": {"k": "v"},
                "cost": {"c": 0.1}, "income": {"i": 1e-3}}"#,
            "generated-1",
            true,
        );
    }

    #[test]
    fn groups_decode_as_measurement_groups() {
        let json = r#"{"uid": "u1", "meter": "api", "account": "acme", "ts": "2024-05-01T10:00:00Z", "measure": {"calls": 2}}"#;
        let wire = Wire::parse(json).unwrap();
        let mut out = Vec::new();
        encode_group_head(&mut out, "org", "api", "m-1", "2024-05-01T10:00:01.000Z", 2);
        wire.encode("u1", false, &mut out);
        wire.encode("u2", false, &mut out);
        let group: MeasurementGroup = rmp_serde::from_slice(&out).unwrap();
        assert_eq!(group.org_id, "org");
        assert_eq!(group.meter_id, "m-1");
        assert_eq!(group.measurements.len(), 2);
        assert_eq!(group.measurements[1].uid, "u2");
        assert_eq!(group.measurements[0].measure["calls"], 2.0);
    }

    #[test]
    fn bodies_are_read_one_measurement_at_a_time() {
        let m = r#"{"uid": "u1", "meter": "api", "account": "a", "ts": "2024-05-01T10:00:00Z"}"#;
        let body = format!(r#"{{"measurements": [{m}, {m}, {m}]}}"#);
        let mut seen = Vec::new();
        let n = for_each_measurement(body.as_bytes(), |w| {
            seen.push(w.account.0.into_owned());
            true
        });
        assert_eq!(n, Some(3));
        assert_eq!(seen, ["a", "a", "a"]);
        // Refusing one stops the reading there.
        let mut calls = 0;
        let n = for_each_measurement(body.as_bytes(), |_| {
            calls += 1;
            calls < 2
        });
        assert_eq!((n, calls), (None, 2));
        assert_eq!(
            for_each_measurement(br#"{"measurements": []}"#, |_| true),
            Some(0)
        );
        for body in [
            format!(r#"{{"measurements": [{m}], "extra": 1}}"#),
            format!(r#"{{"measurements": [{m}], "measurements": [{m}]}}"#),
            format!(r#"{{"measurements": [{m}, {{"meter": 1}}]}}"#),
            format!(r#"{{"measurements": [{m}]}} trailing"#),
            r#"{}"#.to_owned(),
            r#"[]"#.to_owned(),
        ] {
            let n = for_each_measurement(body.as_bytes(), |_| true);
            assert_eq!(n, None, "{body}");
        }
        assert_eq!(
            for_each_measurement(b"{\"measurements\": [\xff]}", |_| true),
            None
        );
    }

    #[test]
    fn odd_shapes_leave_the_fast_path() {
        for json in [
            r#"{"meter": "api", "account": "a", "ts": "t", "measure": {"calls": "many"}}"#,
            r#"{"meter": "api", "account": "a", "ts": "t", "who": {"u": 1}}"#,
            r#"{"meter": "api", "account": "a", "ts": "t", "who": {"u": "a", "u": "b"}}"#,
            r#"{"meter": "api", "account": "a", "ts": "t", "who": null}"#,
            r#"{"meter": "api", "account": "a", "ts": "t", "colour": "red"}"#,
            r#"{"meter": "api", "account": "a"}"#,
            r#"{"meter": 1, "account": "a", "ts": "t"}"#,
            r#"[1]"#,
        ] {
            assert!(Wire::parse(json).is_none(), "{json}");
        }
    }
}
