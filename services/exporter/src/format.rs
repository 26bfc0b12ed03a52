//! File formats of exports: CSV (the default) and JSONL, optionally gzipped.
//!
//! CSV has a header row of the entity type's export columns (the properties
//! of its m3ter response schema, see [`meterline_shared::schema::columns`])
//! plus `deleted`; nested values (objects, arrays) are written as JSON text,
//! `null` and absent fields as empty cells, and cells are quoted as RFC 4180
//! asks. An export with no rows is the header alone. JSONL is one JSON
//! object per line: the entity as the API returns it, plus `deleted`.
//!
//! [`encode_row`] turns a row into its line; [`Encoder`] joins lines into
//! a file, compressing as it goes, and hands them out in chunks so a file
//! is never held whole.

use std::io::Write;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{Map, Value};

use crate::scan;

/// `exportFileFormat` of a schedule or ad-hoc export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// From `exportFileFormat` (absent: CSV, m3ter's default).
    pub fn parse(value: Option<&str>) -> Result<Format, String> {
        match value {
            None | Some("CSV") => Ok(Format::Csv),
            Some("JSONL") => Ok(Format::Jsonl),
            Some(other) => Err(format!(
                "exportFileFormat {other:?} is not supported; use CSV or JSONL"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "CSV",
            Format::Jsonl => "JSONL",
        }
    }

    pub fn extension(self, gzip: bool) -> &'static str {
        match (self, gzip) {
            (Format::Csv, false) => "csv",
            (Format::Csv, true) => "csv.gz",
            (Format::Jsonl, false) => "jsonl",
            (Format::Jsonl, true) => "jsonl.gz",
        }
    }

    pub fn content_type(self, gzip: bool) -> &'static str {
        match (self, gzip) {
            (_, true) => "application/gzip",
            (Format::Csv, false) => "text/csv",
            (Format::Jsonl, false) => "application/x-ndjson",
        }
    }
}

/// One exported entity version: its state, and whether it was deleted.
#[derive(Debug, Clone)]
pub struct Row {
    pub state: State,
    pub deleted: bool,
}

/// An entity's state: inside the stored entity event (its `new`, or its
/// `old` for tombstones and states as of an earlier sequence), written out
/// straight from the event's bytes (the fast path); or parsed, when
/// something must be looked at or changed.
#[derive(Debug, Clone)]
pub enum State {
    /// The message payload, shared with the message (no copy).
    Event {
        payload: Bytes,
        from_old: bool,
    },
    Parsed(Map<String, Value>),
}

/// The `new` state of an entity event, read as `T` (the rest is skipped).
#[derive(serde::Deserialize)]
struct New<T> {
    #[serde(default = "none")]
    new: Option<T>,
}

/// The `old` state of an entity event, read as `T`.
#[derive(serde::Deserialize)]
struct Old<T> {
    #[serde(default = "none")]
    old: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

/// One state of the event in `payload`, read as `T`: only that state is
/// taken apart, the other is skipped over.
fn side<'a, T: serde::Deserialize<'a>>(payload: &'a [u8], from_old: bool) -> Option<T> {
    if from_old {
        serde_json::from_slice::<Old<T>>(payload).ok()?.old
    } else {
        serde_json::from_slice::<New<T>>(payload).ok()?.new
    }
}

impl Row {
    pub fn parsed(state: Map<String, Value>, deleted: bool) -> Row {
        Row {
            state: State::Parsed(state),
            deleted,
        }
    }

    /// The state as a map, parsed on first use.
    pub fn map(&mut self) -> &mut Map<String, Value> {
        if let State::Event { payload, from_old } = &self.state {
            let parsed = side::<Map<String, Value>>(payload, *from_old).unwrap_or_default();
            self.state = State::Parsed(parsed);
        }
        match &mut self.state {
            State::Parsed(m) => m,
            State::Event { .. } => unreachable!("parsed above"),
        }
    }
}

/// Appends the CSV cell of a JSON value given as its text.
fn csv_raw(out: &mut Vec<u8>, text: &[u8]) {
    match text.first() {
        None => {}
        Some(b'n') if text == b"null" => {}
        Some(b'"') => {
            let inner = &text[1..text.len().saturating_sub(1).max(1)];
            if inner.contains(&b'\\') {
                match serde_json::from_slice::<String>(text) {
                    Ok(s) => csv_cell(out, s.as_bytes()),
                    Err(_) => csv_cell(out, inner),
                }
            } else {
                csv_cell(out, inner);
            }
        }
        // Nested values: the stored JSON is already compact JSON text.
        Some(b'{' | b'[') => csv_cell(out, text),
        // Numbers and booleans, as written.
        Some(_) => out.extend_from_slice(text),
    }
}

/// Appends one CSV cell to `out`, quoted when it must be.
fn csv_cell(out: &mut Vec<u8>, text: &[u8]) {
    let needs_quotes = text
        .iter()
        .any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
        || text.first() == Some(&b' ')
        || text.last() == Some(&b' ');
    if !needs_quotes {
        out.extend_from_slice(text);
        return;
    }
    out.push(b'"');
    for &b in text {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn csv_value(out: &mut Vec<u8>, v: Option<&Value>) {
    match v {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => csv_cell(out, s.as_bytes()),
        Some(Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Some(Value::Number(n)) => out.extend_from_slice(n.to_string().as_bytes()),
        Some(nested) => csv_cell(out, nested.to_string().as_bytes()),
    }
}

/// The header line of a CSV file with `columns` (and `deleted`).
pub fn csv_header(columns: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in columns {
        csv_cell(&mut out, c.as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"deleted\r\n");
    out
}

/// Encodes a stored row the scanner could not read by parsing it.
fn encode_parsed(format: Format, columns: &[String], row: &Row, out: &mut Vec<u8>) {
    let mut parsed = row.clone();
    parsed.map();
    encode_row(format, columns, &parsed, out);
}

/// Encodes one row into `out`.
pub fn encode_row(format: Format, columns: &[String], row: &Row, out: &mut Vec<u8>) {
    let deleted: &[u8] = if row.deleted { b"true" } else { b"false" };
    match (format, &row.state) {
        (Format::Csv, State::Parsed(state)) => {
            for c in columns {
                csv_value(out, state.get(c));
                out.push(b',');
            }
            out.extend_from_slice(deleted);
            out.extend_from_slice(b"\r\n");
        }
        (Format::Csv, State::Event { payload, from_old }) => {
            let mut fields = Vec::with_capacity(32);
            if scan::state(payload, *from_old, &mut fields).is_none() {
                return encode_parsed(format, columns, row, out);
            }
            // Columns and fields are mostly in the same order: look from
            // where the last one was found.
            let mut hint = 0;
            let n = fields.len();
            for c in columns {
                let c = c.as_bytes();
                if let Some(i) = (hint..n).chain(0..hint).find(|&i| fields[i].0 == c) {
                    csv_raw(out, fields[i].1);
                    hint = i + 1;
                }
                out.push(b',');
            }
            out.extend_from_slice(deleted);
            out.extend_from_slice(b"\r\n");
        }
        (Format::Jsonl, State::Parsed(state)) => {
            let mut obj = state.clone();
            obj.insert("deleted".into(), Value::Bool(row.deleted));
            // A map of JSON values always serializes.
            let _ = serde_json::to_writer(&mut *out, &obj);
            out.push(b'\n');
        }
        (Format::Jsonl, State::Event { payload, from_old }) => {
            // The stored object with `"deleted"` added before its `}`.
            let text: &[u8] = match scan::side(payload, *from_old) {
                Some(Some(t)) if t.first() == Some(&b'{') => t,
                Some(_) => b"{}",
                None => return encode_parsed(format, columns, row, out),
            };
            let body = text.strip_suffix(b"}").unwrap_or(text).trim_ascii_end();
            out.extend_from_slice(body);
            if !body.ends_with(b"{") {
                out.push(b',');
            }
            out.extend_from_slice(b"\"deleted\":");
            out.extend_from_slice(deleted);
            out.extend_from_slice(b"}\n");
        }
    }
}

/// Joins lines into the bytes of one file (part), compressing if asked,
/// and yields them in chunks of about `chunk` bytes.
pub struct Encoder {
    gzip: Option<GzEncoder<Vec<u8>>>,
    plain: Vec<u8>,
    /// Bytes handed out so far (as stored: compressed when gzip).
    emitted: u64,
    rows: u64,
}

impl Encoder {
    /// A new file: writes the CSV header first.
    pub fn new(format: Format, columns: &[String], gzip: bool) -> Encoder {
        let mut e = Encoder {
            gzip: gzip.then(|| GzEncoder::new(Vec::with_capacity(1 << 20), Compression::fast())),
            plain: Vec::with_capacity(1 << 20),
            emitted: 0,
            rows: 0,
        };
        if format == Format::Csv {
            e.append(&csv_header(columns));
        }
        e
    }

    fn append(&mut self, bytes: &[u8]) {
        match &mut self.gzip {
            // Writing into a Vec cannot fail.
            Some(gz) => {
                let _ = gz.write_all(bytes);
            }
            None => self.plain.extend_from_slice(bytes),
        }
    }

    /// Adds one encoded row (a line from [`encode_row`]).
    pub fn push_line(&mut self, line: &[u8]) {
        self.append(line);
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn buffered(&self) -> usize {
        match &self.gzip {
            Some(gz) => gz.get_ref().len(),
            None => self.plain.len(),
        }
    }

    /// The file's size so far, as stored (compressed output not yet flushed
    /// by the compressor is not counted).
    pub fn size(&self) -> u64 {
        self.emitted + self.buffered() as u64
    }

    /// The bytes ready to go out, if at least `min` are.
    pub fn take(&mut self, min: usize) -> Option<Vec<u8>> {
        if self.buffered() < min.max(1) {
            return None;
        }
        let out = match &mut self.gzip {
            Some(gz) => std::mem::replace(gz.get_mut(), Vec::with_capacity(1 << 20)),
            None => std::mem::replace(&mut self.plain, Vec::with_capacity(1 << 20)),
        };
        self.emitted += out.len() as u64;
        Some(out)
    }

    /// Ends the file and returns its last bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let out = match self.gzip.take() {
            Some(gz) => gz.finish().unwrap_or_default(),
            None => std::mem::take(&mut self.plain),
        };
        self.emitted += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value, deleted: bool) -> Row {
        Row::parsed(v.as_object().unwrap().clone(), deleted)
    }

    fn raw(v: &Value, deleted: bool) -> Row {
        let event = if deleted {
            json!({"action": "deleted", "new": null, "old": v})
        } else {
            json!({"action": "updated", "old": {"id": "older"}, "new": v})
        };
        Row {
            state: State::Event {
                payload: Bytes::from(event.to_string()),
                from_old: deleted,
            },
            deleted,
        }
    }

    #[test]
    fn stored_json_encodes_as_its_parsed_value_does() {
        let cols: Vec<String> = ["id", "name", "tags", "n", "ok", "missing", "nothing"]
            .map(String::from)
            .to_vec();
        for v in [
            json!({"id": "a1", "name": "Acme, \"Inc\"\nLtd \u{e9}", "tags": {"k": [1, 2.5]}, "n": 1.5, "ok": true, "nothing": null}),
            json!({"name": " padded ", "id": "x\\y"}),
            json!({}),
        ] {
            for format in [Format::Csv, Format::Jsonl] {
                for deleted in [false, true] {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    encode_row(format, &cols, &row(v.clone(), deleted), &mut a);
                    encode_row(format, &cols, &raw(&v, deleted), &mut b);
                    if format == Format::Csv {
                        assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
                    } else {
                        let a: Value = serde_json::from_slice(&a).unwrap();
                        let b: Value = serde_json::from_slice(&b).unwrap();
                        assert_eq!(a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn csv_quotes_what_it_must_and_writes_nested_values_as_json() {
        let cols: Vec<String> = ["id", "name", "tags", "n", "missing"]
            .map(String::from)
            .to_vec();
        let mut out = Vec::new();
        encode_row(
            Format::Csv,
            &cols,
            &row(
                json!({"id": "a1", "name": "Acme, \"Inc\"\nLtd", "tags": {"k": [1, 2]}, "n": 1.5}),
                false,
            ),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a1,\"Acme, \"\"Inc\"\"\nLtd\",\"{\"\"k\"\":[1,2]}\",1.5,,false\r\n"
        );
        assert_eq!(csv_header(&cols), b"id,name,tags,n,missing,deleted\r\n");
    }

    #[test]
    fn jsonl_is_the_entity_plus_deleted() {
        let mut out = Vec::new();
        encode_row(
            Format::Jsonl,
            &[],
            &row(json!({"id": "a1", "version": 2}), true),
            &mut out,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"id": "a1", "version": 2, "deleted": true}));
        assert!(out.ends_with(b"\n"));
    }

    #[test]
    fn gzip_output_decompresses_to_the_plain_output() {
        let cols = vec!["id".to_string()];
        let mut plain = Encoder::new(Format::Csv, &cols, false);
        let mut gz = Encoder::new(Format::Csv, &cols, true);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..1000 {
            let mut line = Vec::new();
            let r = row(json!({ "id": format!("id{i}") }), false);
            encode_row(Format::Csv, &cols, &r, &mut line);
            plain.push_line(&line);
            gz.push_line(&line);
            if let Some(c) = gz.take(100) {
                b.extend(c);
            }
            if let Some(c) = plain.take(100) {
                a.extend(c);
            }
        }
        a.extend(plain.finish());
        b.extend(gz.finish());
        let mut d = flate2::read::GzDecoder::new(&b[..]);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut back).unwrap();
        assert_eq!(back, a);
        assert!(a.starts_with(b"id,deleted\r\nid0,false\r\n"));
    }
}
