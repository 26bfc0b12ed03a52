//! Reading the states of stored entity events without parsing them.
//!
//! An export writes each entity state as it was stored: a CSV cell is the
//! field's JSON text (a string's content, a number as written, a nested
//! value as compact JSON). Taking the event apart with a JSON parser costs
//! more than everything else an export does per row, so this scanner only
//! finds where things are: the `new` (or `old`) member of the event, and
//! the members of that object, as spans of the original bytes. It never
//! decodes a string and never builds a value.
//!
//! The events were written by the entities service and are valid JSON; the
//! scanner still checks every step and gives up (`None`) on anything it
//! does not expect, so its callers fall back to a full parse.

/// One member of an object: its key (without quotes; `None` if the key
/// has escapes) and its value's JSON text.
pub type Member<'a> = (&'a [u8], &'a [u8]);

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Where the first `"` or `\` in `b` is. Most strings of an entity are
/// short (keys, codes, timestamps): a plain loop over their first bytes
/// finds the end sooner than starting a vector search for each.
fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    const SHORT: usize = 32;
    let head = &b[..b.len().min(SHORT)];
    if let Some(k) = head.iter().position(|&c| c == b'"' || c == b'\\') {
        return Some(k);
    }
    Some(head.len() + memchr::memchr2(b'"', b'\\', b.get(head.len()..)?)?)
}

/// The end (just past the closing quote) of the string opening at `i`, and
/// whether it has escapes.
fn string_end(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        let k = j + quote_or_backslash(b.get(j..)?)?;
        if b[k] == b'"' {
            return Some((k + 1, escaped));
        }
        escaped = true;
        j = k + 2;
    }
}

/// The end of the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i).map(|(end, _)| end),
        b'{' | b'[' => {
            // Nested values are short: a byte loop, strings skipped whole.
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = string_end(b, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// What [`walk`] does after a member: go on, or stop; either way from
/// the end of the member's value, given.
enum Next {
    On(usize),
    Stop(usize),
}

/// Calls `each` with the key and the value's start of every member of the
/// object opening at `i`, in order; `each` finds where the value ends and
/// says whether to go on. Returns the end of the object (or of the last
/// member looked at, when stopped early).
fn walk<'a>(
    b: &'a [u8],
    i: usize,
    mut each: impl FnMut(Option<&'a [u8]>, usize) -> Option<Next>,
) -> Option<usize> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b'}') {
        return Some(j + 1);
    }
    loop {
        if b.get(j) != Some(&b'"') {
            return None;
        }
        let (key_end, escaped) = string_end(b, j)?;
        let key = (!escaped).then(|| &b[j + 1..key_end - 1]);
        j = skip_ws(b, key_end);
        if b.get(j) != Some(&b':') {
            return None;
        }
        let end = match each(key, skip_ws(b, j + 1))? {
            Next::On(end) => end,
            Next::Stop(end) => return Some(end),
        };
        j = skip_ws(b, end);
        match b.get(j)? {
            b',' => j = skip_ws(b, j + 1),
            b'}' => return Some(j + 1),
            _ => return None,
        }
    }
}

/// Walks the event `payload` to its `new` (or, with `from_old`, its `old`)
/// member and calls `read` with where that value starts; `read` reads it
/// and returns where it ends. `None` when the event, or `read`, gives up.
fn to_side(
    payload: &[u8],
    from_old: bool,
    mut read: impl FnMut(usize) -> Option<usize>,
) -> Option<()> {
    let want: &[u8] = if from_old { b"old" } else { b"new" };
    walk(payload, skip_ws(payload, 0), |key, s| {
        if key == Some(want) {
            read(s).map(Next::Stop)
        } else {
            value_end(payload, s).map(Next::On)
        }
    })?;
    Some(())
}

/// The JSON text of the `new` (or, with `from_old`, the `old`) member of
/// the event in `payload`; `None` when it is absent.
pub fn side(payload: &[u8], from_old: bool) -> Option<Option<&[u8]>> {
    let mut found = None;
    to_side(payload, from_old, |s| {
        let end = value_end(payload, s)?;
        found = Some(&payload[s..end]);
        Some(end)
    })?;
    Some(found)
}

/// The members of the object opening at `i` into `out` (cleared first);
/// returns the object's end, or `None` when there is no object there or a
/// key has escapes.
fn object_at<'a>(b: &'a [u8], i: usize, out: &mut Vec<Member<'a>>) -> Option<usize> {
    out.clear();
    walk(b, i, |key, start| {
        let end = value_end(b, start)?;
        out.push((key?, &b[start..end]));
        Some(Next::On(end))
    })
}

/// The members of the state in the event `payload` (its `new`, or with
/// `from_old` its `old`) into `out` (cleared first), the state's bytes
/// walked once: `Some(true)`; `Some(false)` when the event has no such
/// state (absent or `null`); `None` when the state is not an object or a
/// key has escapes.
pub fn state<'a>(payload: &'a [u8], from_old: bool, out: &mut Vec<Member<'a>>) -> Option<bool> {
    out.clear();
    let mut object = false;
    to_side(payload, from_old, |s| {
        if payload.get(s) == Some(&b'{') {
            object = true;
            return object_at(payload, s, out);
        }
        let end = value_end(payload, s)?;
        (&payload[s..end] == b"null").then_some(end)
    })?;
    Some(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spans(v: &Value) -> Vec<(String, Value)> {
        let text = v.to_string();
        let mut out = Vec::new();
        object_at(text.as_bytes(), 0, &mut out).expect("an object");
        out.into_iter()
            .map(|(k, t)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    serde_json::from_slice(t).expect("a whole value"),
                )
            })
            .collect()
    }

    #[test]
    fn members_are_found_whole_whatever_they_hold() {
        let v = json!({
            "id": "a\"}],{[b",
            "n": -1.5e3,
            "ok": false,
            "none": null,
            "nested": {"a": [1, {"b": "}"}, []], "c": {}},
            "list": [[1, 2], [], "]", {"x": "["}],
            "empty": {},
            "esc": "back\\slash \u{e9} \n",
            "last": [1]
        });
        let got = spans(&v);
        let want: Vec<(String, Value)> = v
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn strings_end_where_they_end_short_or_long_with_escapes_anywhere() {
        // Short strings are searched byte by byte, the rest of a long one
        // by a vector search: an end or an escape on either side of that
        // line, or right on it, is found.
        for len in 0..80 {
            let plain = "a".repeat(len);
            for text in [
                plain.clone(),
                format!("{plain}\""),
                format!("\"{plain}"),
                format!("{plain}\\x"),
                format!("{}\"{}", &plain[..len / 2], &plain[len / 2..]),
            ] {
                let v = json!({ "k": text, "after": "b\\" });
                let got = spans(&v);
                assert_eq!(got[0], ("k".into(), json!(text)), "{text:?}");
                assert_eq!(got[1], ("after".into(), json!("b\\")), "{text:?}");
                // As a key: found whole if plain, refused if escaped.
                let key = json!({ text.clone(): 1 }).to_string();
                let mut out = Vec::new();
                match object_at(key.as_bytes(), 0, &mut out) {
                    Some(_) => assert_eq!(out, [(text.as_bytes(), &b"1"[..])]),
                    None => assert_ne!(text, plain),
                }
            }
        }
    }

    #[test]
    fn the_side_asked_for_is_found_and_nested_names_do_not_confuse_it() {
        let ev = json!({
            "id": "e", "action": "updated",
            "actor": "{\"new\": 1}",
            "old": {"new": {"id": "nested"}, "name": "before"},
            "new": {"id": "a", "name": "after"}
        })
        .to_string();
        let new: Value =
            serde_json::from_slice(side(ev.as_bytes(), false).unwrap().unwrap()).unwrap();
        assert_eq!(new, json!({"id": "a", "name": "after"}));
        let old: Value =
            serde_json::from_slice(side(ev.as_bytes(), true).unwrap().unwrap()).unwrap();
        assert_eq!(old["name"], "before");
        assert_eq!(side(br#"{"new":null}"#, true), Some(None));
        assert_eq!(side(br#"{"new":null}"#, false), Some(Some(&b"null"[..])));
    }

    #[test]
    fn the_members_of_the_state_asked_for_are_found_in_one_walk() {
        let ev = json!({
            "id": "e", "action": "updated",
            "actor": "{\"new\": 1}",
            "new": {"id": "a", "name": "after", "tags": ["x", {"new": 2}]},
            "old": {"new": {"id": "nested"}, "name": "before"}
        })
        .to_string();
        let text = |m: &[Member]| -> Vec<(String, String)> {
            m.iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let mut out = Vec::new();
        assert_eq!(state(ev.as_bytes(), false, &mut out), Some(true));
        assert_eq!(
            text(&out),
            [
                ("id".into(), "\"a\"".into()),
                ("name".into(), "\"after\"".into()),
                ("tags".into(), r#"["x",{"new":2}]"#.into()),
            ]
        );
        assert_eq!(state(ev.as_bytes(), true, &mut out), Some(true));
        assert_eq!(
            text(&out),
            [
                ("new".into(), r#"{"id":"nested"}"#.into()),
                ("name".into(), "\"before\"".into()),
            ]
        );
        // No state: absent or null, and nothing left over from before.
        assert_eq!(
            state(br#"{"new":null,"old":{"a":1}}"#, false, &mut out),
            Some(false)
        );
        assert!(out.is_empty());
        assert_eq!(state(br#"{"new":{"a":1}}"#, true, &mut out), Some(false));
        assert!(out.is_empty());
        // Not readable so: the caller parses instead.
        for bad in [
            &br#"{"new":5}"#[..],
            br#"{"new":nul}"#,
            br#"{"new":{"k\u0041":1}}"#,
            br#"{"new":{"a":1,}}"#,
            br#"{"id":"open, "new":{}}"#,
            b"[]",
        ] {
            assert_eq!(
                state(bad, false, &mut out),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn anything_unexpected_gives_up() {
        let mut out = Vec::new();
        for bad in [
            &b""[..],
            b"[1]",
            b"{\"a\" 1}",
            b"{\"a\":1",
            b"{\"a\":\"open}",
            b"{\"a\":{\"b\":1}",
            b"{\"a\":[1,2}",
            b"{\"k\\u0041\":1}",
        ] {
            assert!(
                object_at(bad, 0, &mut out).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
