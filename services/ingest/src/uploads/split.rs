//! Cutting a top-level JSON array into its elements as the bytes arrive,
//! without holding the whole document.
//!
//! The splitter follows strings (with their escapes) and the nesting of
//! objects and arrays, and hands out each element's bytes once the comma or
//! bracket after it is seen. It checks the array's own structure (an opening
//! `[`, commas between elements, brackets that match, a closing `]` with
//! only whitespace after it) but not the grammar inside an element: callers
//! parse each element, which is where a misspelt literal is caught.
//! Elements larger than the limit given are not kept; their size is
//! reported instead, so one huge row cannot make the reader hold it.

use std::fmt;

/// The deepest nesting accepted inside an element (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// One element of the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element<'a> {
    /// The element's bytes, without the whitespace around it.
    Complete(&'a [u8]),
    /// An element of this many bytes, over the limit: its bytes were
    /// dropped as they went past.
    TooLarge(u64),
}

/// Why the input is not one JSON array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    /// The first non-whitespace byte is not `[`.
    NotAnArray { offset: u64, found: u8 },
    /// A byte that cannot come where it came, e.g. `[1,,2]`, `[1,]`, `[}`.
    Unexpected {
        offset: u64,
        found: u8,
        expected: &'static str,
    },
    /// Objects and arrays nested deeper than [`MAX_DEPTH`].
    TooDeep { offset: u64 },
    /// The input ended before the array was closed (or was empty).
    Truncated { offset: u64, inside: &'static str },
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let byte = |b: u8| {
            if b.is_ascii_graphic() {
                format!("{:?}", b as char)
            } else {
                format!("byte 0x{b:02x}")
            }
        };
        match self {
            SplitError::NotAnArray { offset, found } => write!(
                f,
                "the file must be a JSON array of measurements, but starts with {} at byte {offset}",
                byte(*found)
            ),
            SplitError::Unexpected {
                offset,
                found,
                expected,
            } => write!(
                f,
                "unexpected {} at byte {offset}: expected {expected}",
                byte(*found)
            ),
            SplitError::TooDeep { offset } => write!(
                f,
                "values are nested deeper than {MAX_DEPTH} levels at byte {offset}"
            ),
            SplitError::Truncated { offset: 0, .. } => f.write_str("the file is empty"),
            SplitError::Truncated { offset, inside } => write!(
                f,
                "the file ends after {offset} bytes, {inside}: it is truncated or not a complete JSON array"
            ),
        }
    }
}

impl std::error::Error for SplitError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[`.
    Start,
    /// After `[`: an element or `]`.
    First,
    /// After a comma: an element.
    Next,
    /// Inside an element.
    Element,
    /// After an element's value, before its comma or `]` (whitespace only).
    AfterElement,
    /// After the closing `]`: whitespace only.
    Done,
}

/// A push parser: [`ArraySplitter::feed`] the bytes in any pieces, then
/// [`ArraySplitter::finish`].
#[derive(Debug)]
pub struct ArraySplitter {
    state: State,
    /// Open brackets inside the current element (`{` or `[`).
    stack: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// Bytes of the current element, unless it is over the limit.
    current: Vec<u8>,
    /// Length of the current element, counted even when not kept.
    current_len: u64,
    max_element: usize,
    /// Bytes consumed so far.
    offset: u64,
    elements: u64,
    /// Bytes of a leading byte-order mark seen.
    bom: u8,
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

impl ArraySplitter {
    /// A splitter that keeps elements of up to `max_element` bytes.
    pub fn new(max_element: usize) -> ArraySplitter {
        ArraySplitter {
            state: State::Start,
            stack: Vec::new(),
            in_string: false,
            escaped: false,
            current: Vec::new(),
            current_len: 0,
            max_element,
            offset: 0,
            elements: 0,
            bom: 0,
        }
    }

    /// Elements handed out so far.
    pub fn elements(&self) -> u64 {
        self.elements
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Consumes `bytes`, calling `emit` with every element completed in
    /// them. An error from `emit` stops the splitter and is returned.
    pub fn feed<E>(
        &mut self,
        bytes: &[u8],
        mut emit: impl FnMut(Element<'_>) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                State::Element => {
                    // The hot loop: copy the run of bytes up to the next
                    // one that can change the state.
                    let run = self.scan(&bytes[i..]);
                    if run > 0 {
                        self.keep(&bytes[i..i + run]);
                        i += run;
                        self.offset += run as u64;
                        continue;
                    }
                    self.element_byte(b, &mut emit)?;
                }
                State::Start => {
                    // A UTF-8 byte-order mark, as some editors write, is skipped.
                    let k = self.bom as usize;
                    if k < BOM.len() && self.offset == k as u64 && b == BOM[k] {
                        self.bom += 1;
                    } else if k > 0 && k < BOM.len() {
                        return Err(SplitError::NotAnArray {
                            offset: 0,
                            found: BOM[0],
                        }
                        .into());
                    } else if !is_ws(b) {
                        if b != b'[' {
                            return Err(SplitError::NotAnArray {
                                offset: self.offset,
                                found: b,
                            }
                            .into());
                        }
                        self.state = State::First;
                    }
                }
                State::First | State::Next => {
                    if is_ws(b) {
                    } else if b == b']' && self.state == State::First {
                        self.state = State::Done;
                    } else if matches!(b, b']' | b',' | b'}') {
                        return Err(self.unexpected(b, "a value"));
                    } else {
                        self.state = State::Element;
                        self.current.clear();
                        self.current_len = 0;
                        self.element_byte(b, &mut emit)?;
                    }
                }
                State::AfterElement => {
                    if is_ws(b) {
                    } else if b == b',' || b == b']' {
                        self.state = State::Element;
                        self.element_byte(b, &mut emit)?;
                    } else {
                        return Err(self.unexpected(b, "',' or ']'"));
                    }
                }
                State::Done => {
                    if !is_ws(b) {
                        return Err(self.unexpected(b, "nothing after the closing ']'"));
                    }
                }
            }
            i += 1;
            self.offset += 1;
        }
        Ok(())
    }

    /// Ends the input: the number of elements, or why the input was not a
    /// complete array.
    pub fn finish(&self) -> Result<u64, SplitError> {
        let inside = match self.state {
            State::Done => return Ok(self.elements),
            _ if self.in_string => "inside a string",
            State::Start => "before the array begins",
            State::Element if !self.stack.is_empty() => "inside an element",
            _ => "before the array is closed",
        };
        Err(SplitError::Truncated {
            offset: self.offset,
            inside,
        })
    }

    /// How many leading bytes of `bytes` cannot end the element or change
    /// the nesting: inside a string, everything but `"` and `\`; outside,
    /// everything but quotes, brackets, braces, commas and whitespace.
    fn scan(&self, bytes: &[u8]) -> usize {
        if self.escaped {
            return 0;
        }
        if self.in_string {
            bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .unwrap_or(bytes.len())
        } else {
            bytes
                .iter()
                .position(|&b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']' | b',') || is_ws(b))
                .unwrap_or(bytes.len())
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.current_len += bytes.len() as u64;
        if !self.too_large() {
            self.current.extend_from_slice(bytes);
        } else if !self.current.is_empty() {
            // Over the limit: stop keeping it.
            self.current = Vec::new();
        }
    }

    fn too_large(&self) -> bool {
        self.current_len > self.max_element as u64
    }

    /// One byte that may change the state, inside an element.
    fn element_byte<E>(
        &mut self,
        b: u8,
        emit: &mut impl FnMut(Element<'_>) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            self.keep(&[b]);
            return Ok(());
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.keep(&[b]);
            }
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(SplitError::TooDeep {
                        offset: self.offset,
                    }
                    .into());
                }
                self.stack.push(b);
                self.keep(&[b]);
            }
            b'}' | b']' if !self.stack.is_empty() => {
                let open = self.stack.pop().unwrap_or_default();
                if (open == b'{') != (b == b'}') {
                    return Err(self.unexpected(
                        b,
                        if open == b'{' {
                            "'}' to close the object"
                        } else {
                            "']' to close the array"
                        },
                    ));
                }
                self.keep(&[b]);
            }
            b',' | b']' if self.stack.is_empty() => {
                if self.current_len == 0 {
                    return Err(self.unexpected(b, "a value"));
                }
                let element = if self.too_large() {
                    Element::TooLarge(self.current_len)
                } else {
                    Element::Complete(&self.current)
                };
                self.elements += 1;
                emit(element).map_err(FeedError::Emit)?;
                self.current.clear();
                self.current_len = 0;
                self.state = if b == b',' { State::Next } else { State::Done };
            }
            b'}' => return Err(self.unexpected(b, "',' or ']'")),
            _ if is_ws(b) => {
                // Whitespace ends a value at the top of the element; inside
                // brackets it is kept (it may separate tokens there).
                if self.stack.is_empty() {
                    self.state = State::AfterElement;
                } else {
                    self.keep(&[b]);
                }
            }
            _ => self.keep(&[b]),
        }
        Ok(())
    }

    fn unexpected<E>(&self, found: u8, expected: &'static str) -> FeedError<E> {
        SplitError::Unexpected {
            offset: self.offset,
            found,
            expected,
        }
        .into()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// What stopped [`ArraySplitter::feed`]: the input, or the callback.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedError<E> {
    Split(SplitError),
    Emit(E),
}

impl<E> From<SplitError> for FeedError<E> {
    fn from(e: SplitError) -> Self {
        FeedError::Split(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `input` fed in pieces of `piece` bytes: the elements as
    /// strings (`<too large: n>` for dropped ones) and the count.
    fn split_in(input: &[u8], piece: usize, max: usize) -> Result<Vec<String>, SplitError> {
        let mut s = ArraySplitter::new(max);
        let mut out = Vec::new();
        for chunk in input.chunks(piece.max(1)) {
            s.feed(chunk, |e| {
                out.push(match e {
                    Element::Complete(b) => String::from_utf8(b.to_vec()).unwrap(),
                    Element::TooLarge(n) => format!("<too large: {n}>"),
                });
                Ok::<(), ()>(())
            })
            .map_err(|e| match e {
                FeedError::Split(e) => e,
                FeedError::Emit(()) => unreachable!(),
            })?;
        }
        let n = s.finish()?;
        assert_eq!(n as usize, out.len());
        Ok(out)
    }

    /// Splits `input` in every piece size from 1 to its length and checks
    /// they all agree: the answer must not depend on where reads end.
    fn split(input: &str) -> Result<Vec<String>, SplitError> {
        let whole = split_in(input.as_bytes(), input.len().max(1), 1 << 20);
        for piece in 1..input.len() {
            assert_eq!(
                split_in(input.as_bytes(), piece, 1 << 20),
                whole,
                "pieces of {piece} bytes of {input:?}"
            );
        }
        whole
    }

    #[test]
    fn elements_come_out_as_written_without_surrounding_whitespace() {
        assert_eq!(
            split(r#"[{"a":1}, {"b":[1,2,{"c":{}}]} ,3,"x",true,null,[]]"#).unwrap(),
            [
                r#"{"a":1}"#,
                r#"{"b":[1,2,{"c":{}}]}"#,
                "3",
                r#""x""#,
                "true",
                "null",
                "[]"
            ]
        );
        assert_eq!(
            split(" \n\t[\r\n  {\"uid\" : \"u1\",\n \"m\": { \"x\" : 1 } }\n ,\n{}\n]\n\n")
                .unwrap(),
            ["{\"uid\" : \"u1\",\n \"m\": { \"x\" : 1 } }", "{}"]
        );
    }

    #[test]
    fn empty_arrays_have_no_elements() {
        assert_eq!(split("[]").unwrap(), Vec::<String>::new());
        assert_eq!(split("  [ \n ]  ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn brackets_commas_and_quotes_inside_strings_do_not_count() {
        let input = r#"[{"s":"a]b,c}d{e[f"},{"t":"say \"hi\", then ]"},{"u":"back\\slash\\"},{"v":"\\\"]"}]"#;
        assert_eq!(
            split(input).unwrap(),
            [
                r#"{"s":"a]b,c}d{e[f"}"#,
                r#"{"t":"say \"hi\", then ]"}"#,
                r#"{"u":"back\\slash\\"}"#,
                r#"{"v":"\\\"]"}"#,
            ]
        );
        // Each element is what serde_json reads it to be.
        for e in split(input).unwrap() {
            serde_json::from_str::<serde_json::Value>(&e).unwrap();
        }
        // A top-level string element holding every special character.
        assert_eq!(split(r#"["[,]{}\"\\"]"#).unwrap(), [r#""[,]{}\"\\""#]);
    }

    #[test]
    fn multibyte_text_and_a_byte_order_mark_are_fine() {
        assert_eq!(
            split("\u{feff}[{\"who\":\"Zoë – ☃ 🐧\"}]").unwrap(),
            ["{\"who\":\"Zoë – ☃ 🐧\"}"]
        );
    }

    #[test]
    fn truncated_input_is_an_error_wherever_it_stops() {
        let full = r#"[{"a":"x,]y"},{"b":[1,2]}]"#;
        for end in 0..full.len() {
            let err = split_in(&full.as_bytes()[..end], 3, 1 << 20).unwrap_err();
            assert!(
                matches!(err, SplitError::Truncated { offset, .. } if offset == end as u64),
                "{end}: {err:?}"
            );
        }
        assert_eq!(split("").unwrap_err().to_string(), "the file is empty");
        assert!(split("  \n")
            .unwrap_err()
            .to_string()
            .contains("before the array begins"));
        assert!(split(r#"[{"a":"open"#)
            .unwrap_err()
            .to_string()
            .contains("inside a string"));
        assert!(split("[1,2")
            .unwrap_err()
            .to_string()
            .contains("before the array is closed"));
        assert!(split(r#"[{"a":[1"#)
            .unwrap_err()
            .to_string()
            .contains("inside an element"));
    }

    #[test]
    fn documents_that_are_not_arrays_are_refused_at_their_first_byte() {
        for (input, found) in [
            (r#"{"measurements":[]}"#, b'{'),
            ("  42", b'4'),
            (r#""[1]""#, b'"'),
            ("null", b'n'),
            ("\u{0}", 0),
        ] {
            assert_eq!(
                split(input).unwrap_err(),
                SplitError::NotAnArray {
                    offset: input.find(found as char).unwrap() as u64,
                    found
                },
                "{input:?}"
            );
        }
        assert_eq!(
            split("{}").unwrap_err().to_string(),
            "the file must be a JSON array of measurements, but starts with '{' at byte 0"
        );
    }

    #[test]
    fn broken_array_structure_is_refused_where_it_breaks() {
        for (input, offset) in [
            ("[,1]", 1),
            ("[1,,2]", 3),
            ("[1,]", 3),
            ("[1 2]", 3),
            (r#"[{"a":1} {"b":2}]"#, 9),
            ("[}", 1),
            ("[1}]", 2),
            (r#"[{"a":[1}]"#, 8),
            (r#"[{"a":1]]"#, 7),
            ("[1] 2", 4),
            ("[][]", 2),
        ] {
            match split(input) {
                Err(SplitError::Unexpected { offset: o, .. }) => {
                    assert_eq!(o, offset, "{input:?}")
                }
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("[{}{}]", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(split_in(ok.as_bytes(), 7, 1 << 20).unwrap().len(), 1);
        let deep = format!("[{}]", "[".repeat(MAX_DEPTH + 1));
        assert_eq!(
            split_in(deep.as_bytes(), 7, 1 << 20).unwrap_err(),
            SplitError::TooDeep {
                offset: MAX_DEPTH as u64 + 1
            }
        );
    }

    #[test]
    fn elements_over_the_limit_are_reported_by_size_and_not_kept() {
        let big = format!(r#"{{"s":"{}"}}"#, "x".repeat(100));
        let input = format!(r#"[{{"a":1}},{big},{{"b":2}}]"#);
        for piece in [1, 5, 64, input.len()] {
            assert_eq!(
                split_in(input.as_bytes(), piece, 50).unwrap(),
                [
                    r#"{"a":1}"#.to_owned(),
                    format!("<too large: {}>", big.len()),
                    r#"{"b":2}"#.to_owned()
                ],
                "pieces of {piece}"
            );
        }
        // Exactly at the limit is kept.
        assert_eq!(
            split_in(br#"[{"a":1}]"#, 2, 7).unwrap(),
            [r#"{"a":1}"#.to_owned()]
        );
    }

    #[test]
    fn an_error_from_the_callback_stops_the_splitter() {
        let mut s = ArraySplitter::new(100);
        let mut seen = 0;
        let r = s.feed(b"[1,2,3]", |_| {
            seen += 1;
            if seen == 2 {
                Err("stop")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err(FeedError::Emit("stop")));
        assert_eq!(seen, 2);
    }

    #[test]
    fn many_elements_split_the_same_in_big_and_small_reads() {
        let rows: Vec<String> = (0..2000)
            .map(|i| format!(r#"{{"uid":"u{i}","n":[{i},"{}"]}}"#, "]".repeat(i % 5)))
            .collect();
        let input = format!("[\n{}\n]", rows.join(",\n"));
        for piece in [1, 7, 4096, input.len()] {
            assert_eq!(split_in(input.as_bytes(), piece, 1 << 20).unwrap(), rows);
        }
    }
}
