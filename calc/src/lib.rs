//! m3ter's calculation language, as notification rules use it.
//!
//! A calculation is parsed once, when its rule is saved, into a small tree
//! ([`Calculation::parse`]); a text that does not parse is refused with the
//! position of the first error. Each event is then evaluated against the
//! tree ([`Calculation::eval`]) without allocating: field values are read
//! in place from the event's JSON and strings are borrowed, never copied.
//!
//! The grammar is m3ter's documented one:
//!
//! | what | syntax |
//! |---|---|
//! | literals | numbers (`12`, `0.5`, `1e3`), strings (`"a"` or `'a'`), `true`, `false`, `null`, `Math.PI` |
//! | fields | `new.<field>` and `old.<field>`, nested with more dots (`new.customFields.tier`); a field the event does not have is `null` |
//! | arithmetic | `+ - * / % ^` (`^` is power, right-associative), unary `-` and `+`, parentheses |
//! | comparison | `== != < > <= >=` (numbers with numbers, strings with strings) |
//! | logic | `AND`, `OR` (also written `and`, `or`), ternary `c ? a : b` |
//! | functions | `Math.max(a, b, ...)`, `Math.min(a, b, ...)`, `Math.floor(x[, scale])`, `Math.ceil(x[, scale])`, `Math.round(x[, scale])` (halves round up), `Math.pow(x, y)`, `Math.abs(x)`, `isnull(a, b)` (`a` unless it is null, else `b`), `IN(value, c1, c2, ...)` (whether `value` equals one of the candidates) |
//!
//! Precedence, loosest first: `? :`, `OR`, `AND`, `== !=`, `< > <= >=`,
//! `+ -`, `* / %`, unary `- +`, `^`.
//!
//! `null` propagates through arithmetic and functions (`null * 100` is
//! `null`), a comparison with `null` other than `==`/`!=` is `false`, and
//! `AND`, `OR` and `?:` read `null` as `false`. So
//! `old.amountSpent <= old.amount OR old.amountSpent == null` is `true` on a
//! created event, which has no `old`. Mixing types (`"a" > 1`, `1 AND
//! true`, `"x" == 2`) is an evaluation error, as is dividing by zero: the
//! rule does not fire and the error is reported. A calculation is true when
//! it evaluates to `true`; `false` and `null` are false, any other result is
//! an error.

use std::fmt;

use serde_json::Value as Json;

/// The deepest nesting of parentheses and operators accepted: keeps a
/// hostile calculation from exhausting the stack.
pub const MAX_DEPTH: usize = 64;
/// The longest calculation accepted, in bytes.
pub const MAX_LEN: usize = 10_000;

/// Why a calculation does not parse, and where (1-based character position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub position: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at position {}: {}", self.position, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Why an event could not be evaluated (a type mismatch, a division by
/// zero, a result that is not a boolean).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    pub message: String,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EvalError {}

fn mismatch(message: String) -> EvalError {
    EvalError { message }
}

/// A value during evaluation; strings borrow from the event or the tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'a str),
    /// A JSON array or object: only comparable with `null`.
    Other(&'static str),
}

impl Value<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Num(_) => "number",
            Value::Str(_) => "string",
            Value::Other(t) => t,
        }
    }
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Num(n) => write!(f, "{n}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Other(t) => write!(f, "<{t}>"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    New,
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Max,
    Min,
    Floor,
    Ceil,
    Round,
    Pow,
    Abs,
    IsNull,
    In,
}

impl Func {
    fn lookup(name: &str) -> Option<Func> {
        Some(match name {
            "Math.max" => Func::Max,
            "Math.min" => Func::Min,
            "Math.floor" => Func::Floor,
            "Math.ceil" => Func::Ceil,
            "Math.round" => Func::Round,
            "Math.pow" => Func::Pow,
            "Math.abs" => Func::Abs,
            "isnull" => Func::IsNull,
            "IN" | "in" => Func::In,
            _ => return None,
        })
    }

    /// Smallest and largest number of arguments.
    fn arity(self) -> (usize, usize) {
        match self {
            Func::Max | Func::Min | Func::In => (2, usize::MAX),
            Func::Floor | Func::Ceil | Func::Round => (1, 2),
            Func::Pow | Func::IsNull => (2, 2),
            Func::Abs => (1, 1),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Num(f64),
    Str(Box<str>),
    Field(Side, Box<[Box<str>]>),
    Neg(Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Call(Func, Box<[Node]>),
}

/// A parsed calculation, ready to evaluate any number of events.
#[derive(Debug, Clone, PartialEq)]
pub struct Calculation {
    source: String,
    root: Node,
}

impl Calculation {
    /// Parses `source`; the error names the (1-based) character position of
    /// the first problem.
    pub fn parse(source: &str) -> Result<Calculation, ParseError> {
        if source.len() > MAX_LEN {
            return Err(ParseError {
                position: 1,
                message: format!("a calculation may be at most {MAX_LEN} characters long"),
            });
        }
        let tokens = lex(source)?;
        let mut p = Parser {
            tokens: &tokens,
            pos: 0,
            depth: 0,
            end: source.chars().count() + 1,
        };
        let root = p.expr(0)?;
        if let Some(t) = p.peek() {
            return Err(ParseError {
                position: t.pos,
                message: format!("unexpected {} after the end of the expression", t.kind),
            });
        }
        Ok(Calculation {
            source: source.to_owned(),
            root,
        })
    }

    /// The text the calculation was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the calculation holds for `event`, a JSON object with `new`
    /// and `old` (either may be missing or `null`).
    pub fn eval(&self, event: &Json) -> Result<bool, EvalError> {
        match self.value(event)? {
            Value::Bool(b) => Ok(b),
            Value::Null => Ok(false),
            other => Err(mismatch(format!(
                "the calculation must give true or false, but gives the {} {other}",
                other.type_name()
            ))),
        }
    }

    /// The value of the calculation for `event`.
    pub fn value<'a>(&'a self, event: &'a Json) -> Result<Value<'a>, EvalError> {
        eval(&self.root, event)
    }
}

// ---------------------------------------------------------------- lexing

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Num(f64),
    Str(String),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    Question,
    Colon,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Num(n) => write!(f, "number {n}"),
            Kind::Str(s) => write!(f, "string {s:?}"),
            Kind::Ident(s) => write!(f, "{s:?}"),
            Kind::Op(o) => write!(f, "'{o}'"),
            Kind::LParen => f.write_str("'('"),
            Kind::RParen => f.write_str("')'"),
            Kind::Comma => f.write_str("','"),
            Kind::Question => f.write_str("'?'"),
            Kind::Colon => f.write_str("':'"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based character position.
    pos: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |pos: usize, message: String| ParseError {
        position: pos + 1,
        message,
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let kind = if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            let n = text
                .parse::<f64>()
                .map_err(|_| err(start, format!("{text:?} is not a number")))?;
            Kind::Num(n)
        } else if c == '"' || c == '\'' {
            i += 1;
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(err(start, "string is not closed".into()));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(err(start, "string is not closed".into()));
                    };
                    i += 1;
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    s.push(d);
                }
            }
            Kind::Str(s)
        } else if c.is_alphabetic() || c == '_' {
            loop {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                // A dot continues the name (`new.amount`, `Math.max`).
                if i + 1 < chars.len()
                    && chars[i] == '.'
                    && (chars[i + 1].is_alphabetic() || chars[i + 1] == '_')
                {
                    i += 1;
                    continue;
                }
                break;
            }
            Kind::Ident(chars[start..i].iter().collect())
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op2 = ["==", "!=", "<=", ">=", "&&", "||"]
                .into_iter()
                .find(|o| *o == two);
            if let Some(op) = op2 {
                if op == "&&" || op == "||" {
                    let word = if op == "&&" { "AND" } else { "OR" };
                    return Err(err(
                        start,
                        format!("'{op}' is not an operator here: write {word}"),
                    ));
                }
                i += 2;
                Kind::Op(op)
            } else {
                i += 1;
                match c {
                    '+' => Kind::Op("+"),
                    '-' => Kind::Op("-"),
                    '*' => Kind::Op("*"),
                    '/' => Kind::Op("/"),
                    '%' => Kind::Op("%"),
                    '^' => Kind::Op("^"),
                    '<' => Kind::Op("<"),
                    '>' => Kind::Op(">"),
                    '(' => Kind::LParen,
                    ')' => Kind::RParen,
                    ',' => Kind::Comma,
                    '?' => Kind::Question,
                    ':' => Kind::Colon,
                    '=' => {
                        return Err(err(
                            start,
                            "'=' is not an operator: write '==' to compare".into(),
                        ))
                    }
                    other => return Err(err(start, format!("unexpected character {other:?}"))),
                }
            }
        };
        out.push(Token {
            kind,
            pos: start + 1,
        });
    }
    Ok(out)
}

// --------------------------------------------------------------- parsing

struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
    depth: usize,
    /// Position just past the end, for "unexpected end" errors.
    end: usize,
}

fn infix(kind: &Kind) -> Option<(u8, u8)> {
    // (left binding power, right binding power)
    Some(match kind {
        Kind::Question => (2, 1),
        Kind::Ident(w) if w.eq_ignore_ascii_case("or") => (3, 4),
        Kind::Ident(w) if w.eq_ignore_ascii_case("and") => (5, 6),
        Kind::Op("==") | Kind::Op("!=") => (7, 8),
        Kind::Op("<") | Kind::Op(">") | Kind::Op("<=") | Kind::Op(">=") => (9, 10),
        Kind::Op("+") | Kind::Op("-") => (11, 12),
        Kind::Op("*") | Kind::Op("/") | Kind::Op("%") => (13, 14),
        Kind::Op("^") => (18, 17),
        _ => return None,
    })
}

/// Binding power of the operand of unary `-` and `+`: tighter than `*`,
/// looser than `^`, so `-2^2` is `-(2^2)`.
const PREFIX_BP: u8 = 15;

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn here(&self) -> usize {
        self.peek().map(|t| t.pos).unwrap_or(self.end)
    }

    fn fail<T>(&self, position: usize, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            position,
            message: message.into(),
        })
    }

    fn expect(&mut self, kind: Kind, what: &str) -> Result<(), ParseError> {
        match self.next() {
            Some(t) if t.kind == kind => Ok(()),
            Some(t) => self.fail(t.pos, format!("expected {what}, found {}", t.kind)),
            None => self.fail(self.end, format!("expected {what}, found the end")),
        }
    }

    fn expr(&mut self, min_bp: u8) -> Result<Node, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.fail(self.here(), "the calculation is nested too deeply");
        }
        let mut lhs = self.prefix()?;
        while let Some(t) = self.peek() {
            let Some((l_bp, r_bp)) = infix(&t.kind) else {
                break;
            };
            if l_bp < min_bp {
                break;
            }
            let op = self.next().map(|t| t.kind).unwrap_or(Kind::Comma);
            if op == Kind::Question {
                let then = self.expr(0)?;
                self.expect(Kind::Colon, "':' of the ternary")?;
                let otherwise = self.expr(r_bp)?;
                lhs = Node::Cond(Box::new(lhs), Box::new(then), Box::new(otherwise));
                continue;
            }
            let rhs = self.expr(r_bp)?;
            let (l, r) = (Box::new(lhs), Box::new(rhs));
            lhs = match op {
                Kind::Ident(w) if w.eq_ignore_ascii_case("or") => Node::Or(l, r),
                Kind::Ident(_) => Node::And(l, r),
                Kind::Op(o) => Node::Bin(
                    match o {
                        "+" => BinOp::Add,
                        "-" => BinOp::Sub,
                        "*" => BinOp::Mul,
                        "/" => BinOp::Div,
                        "%" => BinOp::Rem,
                        "^" => BinOp::Pow,
                        "==" => BinOp::Eq,
                        "!=" => BinOp::Ne,
                        "<" => BinOp::Lt,
                        ">" => BinOp::Gt,
                        "<=" => BinOp::Le,
                        _ => BinOp::Ge,
                    },
                    l,
                    r,
                ),
                other => {
                    return self.fail(self.here(), format!("unexpected {other}"));
                }
            };
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn prefix(&mut self) -> Result<Node, ParseError> {
        let Some(t) = self.next() else {
            return self.fail(self.end, "the calculation ends where a value was expected");
        };
        match t.kind {
            Kind::Num(n) => Ok(Node::Num(n)),
            Kind::Str(s) => Ok(Node::Str(s.into_boxed_str())),
            Kind::Op("-") => Ok(Node::Neg(Box::new(self.expr(PREFIX_BP)?))),
            Kind::Op("+") => self.expr(PREFIX_BP),
            Kind::LParen => {
                let inner = self.expr(0)?;
                self.expect(Kind::RParen, "')'")?;
                Ok(inner)
            }
            Kind::Ident(name) => self.name(name, t.pos),
            other => self.fail(t.pos, format!("expected a value, found {other}")),
        }
    }

    fn name(&mut self, name: String, pos: usize) -> Result<Node, ParseError> {
        if matches!(
            self.peek(),
            Some(Token {
                kind: Kind::LParen,
                ..
            })
        ) {
            let Some(func) = Func::lookup(&name) else {
                return self.fail(
                    pos,
                    format!(
                        "unknown function {name:?}; known: Math.max, Math.min, Math.floor, Math.ceil, \
                         Math.round, Math.pow, Math.abs, isnull, IN"
                    ),
                );
            };
            self.next();
            let mut args = Vec::new();
            if !matches!(
                self.peek(),
                Some(Token {
                    kind: Kind::RParen,
                    ..
                })
            ) {
                loop {
                    args.push(self.expr(0)?);
                    match self.next() {
                        Some(Token {
                            kind: Kind::Comma, ..
                        }) => continue,
                        Some(Token {
                            kind: Kind::RParen, ..
                        }) => break,
                        Some(t) => {
                            return self
                                .fail(t.pos, format!("expected ',' or ')', found {}", t.kind))
                        }
                        None => return self.fail(self.end, "expected ')', found the end"),
                    }
                }
            } else {
                self.next();
            }
            let (lo, hi) = func.arity();
            if args.len() < lo || args.len() > hi {
                let wanted = match (lo, hi) {
                    (l, h) if l == h => format!("{l}"),
                    (l, usize::MAX) => format!("at least {l}"),
                    (l, h) => format!("{l} or {h}"),
                };
                return self.fail(
                    pos,
                    format!(
                        "{name} takes {wanted} argument{}, not {}",
                        if hi == 1 { "" } else { "s" },
                        args.len()
                    ),
                );
            }
            return Ok(Node::Call(func, args.into_boxed_slice()));
        }
        match name.as_str() {
            "null" => return Ok(Node::Null),
            "true" => return Ok(Node::Bool(true)),
            "false" => return Ok(Node::Bool(false)),
            "Math.PI" => return Ok(Node::Num(std::f64::consts::PI)),
            _ => {}
        }
        let mut parts = name.split('.');
        let side = match parts.next() {
            Some("new") => Side::New,
            Some("old") => Side::Old,
            _ => {
                return self.fail(
                    pos,
                    format!("unknown name {name:?}: fields are written new.<field> or old.<field>"),
                )
            }
        };
        let path: Vec<Box<str>> = parts.map(Box::from).collect();
        if path.is_empty() {
            return self.fail(pos, format!("{name:?} needs a field name: {name}.<field>"));
        }
        Ok(Node::Field(side, path.into_boxed_slice()))
    }
}

// ------------------------------------------------------------ evaluation

fn field<'a>(event: &'a Json, side: Side, path: &[Box<str>]) -> Value<'a> {
    let mut v = match side {
        Side::New => event.get("new"),
        Side::Old => event.get("old"),
    };
    for key in path {
        v = v.and_then(|v| v.get(&**key));
    }
    match v {
        None | Some(Json::Null) => Value::Null,
        Some(Json::Bool(b)) => Value::Bool(*b),
        Some(Json::Number(n)) => n.as_f64().map(Value::Num).unwrap_or(Value::Null),
        Some(Json::String(s)) => Value::Str(s),
        Some(Json::Array(_)) => Value::Other("array"),
        Some(Json::Object(_)) => Value::Other("object"),
    }
}

fn truth(v: Value<'_>, what: &str) -> Result<bool, EvalError> {
    match v {
        Value::Bool(b) => Ok(b),
        Value::Null => Ok(false),
        other => Err(mismatch(format!(
            "{what} needs true or false, not the {} {other}",
            other.type_name()
        ))),
    }
}

fn number(v: Value<'_>, what: &str) -> Result<Option<f64>, EvalError> {
    match v {
        Value::Num(n) => Ok(Some(n)),
        Value::Null => Ok(None),
        other => Err(mismatch(format!(
            "{what} needs a number, not the {} {other}",
            other.type_name()
        ))),
    }
}

/// `==` between two values: `None` when their types cannot be compared.
fn equal(a: Value<'_>, b: Value<'_>) -> Option<bool> {
    match (a, b) {
        (Value::Null, Value::Null) => Some(true),
        (Value::Null, _) | (_, Value::Null) => Some(false),
        (Value::Num(x), Value::Num(y)) => Some(x == y),
        (Value::Str(x), Value::Str(y)) => Some(x == y),
        (Value::Bool(x), Value::Bool(y)) => Some(x == y),
        _ => None,
    }
}

fn op_name(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Pow => "^",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Gt => ">",
        BinOp::Le => "<=",
        BinOp::Ge => ">=",
    }
}

fn scaled(x: f64, scale: Option<f64>, f: fn(f64) -> f64) -> f64 {
    match scale {
        None => f(x),
        Some(s) => {
            let m = 10f64.powi(s.trunc() as i32);
            f(x * m) / m
        }
    }
}

fn round_half_up(x: f64) -> f64 {
    (x + 0.5).floor()
}

fn eval<'a>(node: &'a Node, event: &'a Json) -> Result<Value<'a>, EvalError> {
    Ok(match node {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(*b),
        Node::Num(n) => Value::Num(*n),
        Node::Str(s) => Value::Str(s),
        Node::Field(side, path) => field(event, *side, path),
        Node::Neg(inner) => match number(eval(inner, event)?, "unary '-'")? {
            Some(n) => Value::Num(-n),
            None => Value::Null,
        },
        Node::And(l, r) => {
            Value::Bool(truth(eval(l, event)?, "AND")? && truth(eval(r, event)?, "AND")?)
        }
        Node::Or(l, r) => {
            Value::Bool(truth(eval(l, event)?, "OR")? || truth(eval(r, event)?, "OR")?)
        }
        Node::Cond(c, a, b) => {
            if truth(eval(c, event)?, "the condition of '?'")? {
                eval(a, event)?
            } else {
                eval(b, event)?
            }
        }
        Node::Bin(op, l, r) => binary(*op, eval(l, event)?, eval(r, event)?)?,
        Node::Call(func, args) => call(*func, args, event)?,
    })
}

fn binary<'a>(op: BinOp, a: Value<'a>, b: Value<'a>) -> Result<Value<'a>, EvalError> {
    let incompatible = || {
        mismatch(format!(
            "'{}' cannot compare the {} {a} with the {} {b}",
            op_name(op),
            a.type_name(),
            b.type_name()
        ))
    };
    match op {
        BinOp::Eq | BinOp::Ne => {
            let eq = equal(a, b).ok_or_else(incompatible)?;
            Ok(Value::Bool(if op == BinOp::Eq { eq } else { !eq }))
        }
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let ord = match (a, b) {
                (Value::Null, _) | (_, Value::Null) => return Ok(Value::Bool(false)),
                (Value::Num(x), Value::Num(y)) => x.partial_cmp(&y),
                (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
                _ => return Err(incompatible()),
            };
            let Some(ord) = ord else {
                return Ok(Value::Bool(false));
            };
            use std::cmp::Ordering::*;
            Ok(Value::Bool(match op {
                BinOp::Lt => ord == Less,
                BinOp::Gt => ord == Greater,
                BinOp::Le => ord != Greater,
                _ => ord != Less,
            }))
        }
        _ => {
            let what = format!("'{}'", op_name(op));
            let (Some(x), Some(y)) = (number(a, &what)?, number(b, &what)?) else {
                return Ok(Value::Null);
            };
            Ok(Value::Num(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div | BinOp::Rem if y == 0.0 => {
                    return Err(mismatch(format!("{x} {} 0: division by zero", op_name(op))))
                }
                BinOp::Div => x / y,
                BinOp::Rem => x % y,
                _ => x.powf(y),
            }))
        }
    }
}

fn call<'a>(func: Func, args: &'a [Node], event: &'a Json) -> Result<Value<'a>, EvalError> {
    let name = match func {
        Func::Max => "Math.max",
        Func::Min => "Math.min",
        Func::Floor => "Math.floor",
        Func::Ceil => "Math.ceil",
        Func::Round => "Math.round",
        Func::Pow => "Math.pow",
        Func::Abs => "Math.abs",
        Func::IsNull => "isnull",
        Func::In => "IN",
    };
    match func {
        Func::IsNull => {
            let first = eval(&args[0], event)?;
            if first == Value::Null {
                eval(&args[1], event)
            } else {
                Ok(first)
            }
        }
        Func::In => {
            let needle = eval(&args[0], event)?;
            for candidate in &args[1..] {
                if equal(needle, eval(candidate, event)?) == Some(true) {
                    return Ok(Value::Bool(true));
                }
            }
            Ok(Value::Bool(false))
        }
        Func::Max | Func::Min => {
            let mut best: Option<f64> = None;
            for arg in args {
                let Some(n) = number(eval(arg, event)?, name)? else {
                    return Ok(Value::Null);
                };
                best = Some(match best {
                    None => n,
                    Some(b) if func == Func::Max => b.max(n),
                    Some(b) => b.min(n),
                });
            }
            Ok(best.map(Value::Num).unwrap_or(Value::Null))
        }
        Func::Floor | Func::Ceil | Func::Round => {
            let Some(x) = number(eval(&args[0], event)?, name)? else {
                return Ok(Value::Null);
            };
            let scale = match args.get(1) {
                Some(a) => match number(eval(a, event)?, name)? {
                    Some(s) => Some(s),
                    None => return Ok(Value::Null),
                },
                None => None,
            };
            let f: fn(f64) -> f64 = match func {
                Func::Floor => f64::floor,
                Func::Ceil => f64::ceil,
                _ => round_half_up,
            };
            Ok(Value::Num(scaled(x, scale, f)))
        }
        Func::Pow => {
            let (Some(x), Some(y)) = (
                number(eval(&args[0], event)?, name)?,
                number(eval(&args[1], event)?, name)?,
            ) else {
                return Ok(Value::Null);
            };
            Ok(Value::Num(x.powf(y)))
        }
        Func::Abs => Ok(match number(eval(&args[0], event)?, name)? {
            Some(x) => Value::Num(x.abs()),
            None => Value::Null,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The two example calculations of m3ter's documentation, verbatim.
    const ONE_ACCOUNT: &str = r#"new.accountId == "df41d216-XXXX-470f-YYYY-79b16059a96f""#;
    const NINETY_PERCENT: &str = "(new.amountSpent >= ((new.amount*100)/90)) AND ((old.amountSpent <= ((old.amount*100)/90)) OR (old.amountSpent == null))";

    fn val(src: &str) -> String {
        let c = Calculation::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        match c.value(&json!({})) {
            Ok(v) => v.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn the_documented_examples_work_verbatim() {
        let c = Calculation::parse(ONE_ACCOUNT).unwrap();
        let ev = |id: &str| json!({"new": {"accountId": id}, "old": null});
        assert!(c.eval(&ev("df41d216-XXXX-470f-YYYY-79b16059a96f")).unwrap());
        assert!(!c.eval(&ev("someone-else")).unwrap());
        assert!(!c.eval(&json!({"new": {}})).unwrap());

        // amount 900: the threshold (amount*100/90) is 1000.
        let c = Calculation::parse(NINETY_PERCENT).unwrap();
        let update = |old: Option<f64>, new: f64| {
            let old = old.map(|s| json!({"amount": 900, "amountSpent": s}));
            json!({"new": {"amount": 900, "amountSpent": new}, "old": old})
        };
        // Created already over the threshold: no old state.
        assert!(c.eval(&update(None, 1200.0)).unwrap());
        assert!(!c.eval(&update(None, 10.0)).unwrap());
        // A series of updates crosses the threshold once.
        let series = [0.0, 400.0, 999.0, 1001.0, 1100.0, 1500.0];
        let fired: Vec<bool> = series
            .windows(2)
            .map(|w| c.eval(&update(Some(w[0]), w[1])).unwrap())
            .collect();
        assert_eq!(fired, [false, false, true, false, false]);
        // A commitment whose old state lacks amountSpent.
        let ev = json!({"new": {"amount": 900, "amountSpent": 2000}, "old": {"amount": 900}});
        assert!(c.eval(&ev).unwrap());
    }

    #[test]
    fn arithmetic_and_precedence() {
        assert_eq!(val("1 + 2 * 3"), "7");
        assert_eq!(val("(1 + 2) * 3"), "9");
        assert_eq!(val("2 ^ 3 ^ 2"), "512");
        assert_eq!(val("-2 ^ 2"), "-4");
        assert_eq!(val("10 % 4 - -1"), "3");
        assert_eq!(val("+5 / 2"), "2.5");
        assert_eq!(val("1e3 + .5"), "1000.5");
        assert_eq!(
            val("1 < 2 AND 2 <= 2 AND 3 > 2 AND 3 >= 4 == false"),
            "true"
        );
        assert_eq!(val("1 == 1 OR 1 / 0 == 1"), "true");
        assert_eq!(val("true ? 1 : 2"), "1");
        assert_eq!(val("false ? 1 : true ? 2 : 3"), "2");
        assert_eq!(val("1 > 2 ? \"a\" : 'b'"), "\"b\"");
        assert_eq!(val("\"abc\" < \"abd\""), "true");
        assert_eq!(val("null == null"), "true");
        assert_eq!(val("1 != null"), "true");
    }

    #[test]
    fn functions_with_scales() {
        assert_eq!(val("Math.max(1, 5, 3)"), "5");
        assert_eq!(val("Math.min(4, -2)"), "-2");
        assert_eq!(val("Math.round(2.5)"), "3");
        assert_eq!(val("Math.round(-2.5)"), "-2");
        assert_eq!(val("Math.round(3.14159, 2)"), "3.14");
        assert_eq!(val("Math.round(1250, -2)"), "1300");
        assert_eq!(val("Math.floor(2.789, 1)"), "2.7");
        assert_eq!(val("Math.ceil(2.21, 1)"), "2.3");
        assert_eq!(val("Math.pow(2, 10)"), "1024");
        assert_eq!(val("Math.abs(-2)"), "2");
        assert_eq!(val("isnull(new.missing, 7)"), "7");
        assert_eq!(val("isnull(3, 7)"), "3");
        assert_eq!(val("IN(\"b\", \"a\", \"b\")"), "true");
        assert_eq!(
            val("IN(new.status, \"completed\", \"succeeded\") ? true : false"),
            "false"
        );
        assert_eq!(val("Math.PI > 3.14"), "true");
    }

    #[test]
    fn null_propagates_and_compares_false() {
        assert_eq!(val("new.x * 100"), "null");
        assert_eq!(val("new.x <= 5"), "false");
        assert_eq!(val("Math.max(new.x, 5)"), "null");
        let c = Calculation::parse("new.x > 5").unwrap();
        assert!(!c.eval(&json!({"new": null})).unwrap());
        let c = Calculation::parse("new.customFields.tier == \"gold\"").unwrap();
        assert!(c
            .eval(&json!({"new": {"customFields": {"tier": "gold"}}}))
            .unwrap());
    }

    #[test]
    fn syntax_errors_name_their_position() {
        let cases = [
            ("new.amount >", 13, "ends where a value"),
            ("(new.amount > 5", 16, "expected ')'"),
            ("new.amount = 5", 12, "'=='"),
            ("new.amount > 5 && true", 16, "write AND"),
            ("foo(1)", 1, "unknown function"),
            ("Math.sqrt(4)", 1, "unknown function"),
            ("amount > 5", 1, "unknown name"),
            ("new > 5", 1, "needs a field name"),
            ("Math.abs(1, 2)", 1, "takes 1 argument"),
            ("Math.pow(1)", 1, "takes 2 arguments"),
            ("1 2", 3, "unexpected number"),
            ("\"open", 1, "not closed"),
            ("1 ? 2", 6, "':'"),
            ("", 1, "ends where a value"),
            ("new.a # 1", 7, "unexpected character"),
        ];
        for (src, pos, text) in cases {
            let e = Calculation::parse(src).expect_err(src);
            assert_eq!(e.position, pos, "{src}: {e}");
            assert!(e.message.contains(text), "{src}: {e}");
        }
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(Calculation::parse(&deep)
            .unwrap_err()
            .message
            .contains("nested too deeply"));
    }

    #[test]
    fn type_mismatches_are_evaluation_errors() {
        let ev = json!({"new": {"name": "acme", "n": 3, "flag": true, "tags": ["a"]}});
        for src in [
            "new.name > 5",
            "new.name + 1 == 2",
            "new.n AND true",
            "new.n == \"3\"",
            "new.tags == 1",
            "new.n / 0 == 1",
            "new.n + 1",
            "-new.name == 1",
            "Math.abs(new.flag) == 1",
        ] {
            let c = Calculation::parse(src).unwrap();
            assert!(c.eval(&ev).is_err(), "{src} should not evaluate");
        }
        let c = Calculation::parse("new.tags == null").unwrap();
        assert!(!c.eval(&ev).unwrap());
    }
}
