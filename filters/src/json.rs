//! Untrusted JSON: a parser that refuses duplicate keys, and writes that
//! never panic.
//!
//! Request bodies and provider replies are untrusted. Two rules hold for
//! every module that touches them:
//! - Parse request bodies with [`parse_strict`]. `serde_json` keeps the last
//!   of two equal keys while a provider may keep the first, so a request
//!   with two `tools` or two `model` keys would be checked on one value and
//!   served on the other. Duplicates are refused instead.
//! - Never write through `value["key"] = ...` (serde_json's `IndexMut`
//!   panics when the value is not an object, and a panic on the request
//!   path is a denial of service). Read with `get`/`pointer`/`as_*`, write
//!   with [`set`] or `get_mut`. A test in the gateway scans the sources for
//!   the forbidden forms.

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Parse one JSON document, refusing duplicate keys at any depth. Nesting
/// is bounded by serde_json's recursion limit (128).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    parse_strict_bounded(bytes, usize::MAX).map_err(|e| match e {
        Bounded::Json(e) => e,
        Bounded::TooMany(_) => serde_json::Error::custom("too many JSON values"),
    })
}

/// Why [`parse_strict_bounded`] refused a document.
#[derive(Debug)]
pub enum Bounded {
    Json(serde_json::Error),
    /// More values (strings, numbers, arrays, objects…) than allowed.
    TooMany(usize),
}

/// [`parse_strict`] that stops once the document holds more than
/// `max_values` values, before building them: a body of many tiny values
/// costs far more memory parsed than its size.
pub fn parse_strict_bounded(bytes: &[u8], max_values: usize) -> Result<Value, Bounded> {
    let left = std::cell::Cell::new(max_values);
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = Strict {
        left: &left,
        over: &over,
    };
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if over.get() => Err(Bounded::TooMany(max_values)),
        Err(e) => Err(Bounded::Json(e)),
    }
}

#[derive(Clone, Copy)]
struct Strict<'a> {
    left: &'a std::cell::Cell<usize>,
    over: &'a std::cell::Cell<bool>,
}

impl Strict<'_> {
    /// Count one value against the budget.
    fn take<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => {
                self.over.set(true);
                Err(E::custom("too many JSON values"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number is out of range"))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key `{key}`")));
            }
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Set `value` at `path`, creating objects where a key is missing or null.
/// Returns false, changing nothing, when something other than an object or
/// null is in the way.
pub fn set(target: &mut Value, path: &[&str], value: Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        *target = value;
        return true;
    };
    let mut at = target;
    for key in parents {
        if at.is_null() {
            *at = Value::Object(Map::new());
        }
        let Some(obj) = at.as_object_mut() else {
            return false;
        };
        at = obj.entry(*key).or_insert(Value::Null);
    }
    if at.is_null() {
        *at = Value::Object(Map::new());
    }
    match at.as_object_mut() {
        Some(obj) => {
            obj.insert((*last).to_string(), value);
            true
        }
        None => false,
    }
}

/// The entries of the array at `key` of an object; none for anything else
/// (a missing key, a value of another type, a value that is no object).
pub fn items<'v>(value: &'v Value, key: &str) -> std::slice::Iter<'v, Value> {
    match value.get(key) {
        Some(Value::Array(a)) => a.iter(),
        _ => [].iter(),
    }
}

/// The array at `key` of an object, for writing; `None` for anything else.
pub fn array_mut<'v>(value: &'v mut Value, key: &str) -> Option<&'v mut Vec<Value>> {
    value.get_mut(key)?.as_array_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn items_of_anything_but_an_array_are_none() {
        let v = json!({"a": [1, 2], "b": "x"});
        assert_eq!(items(&v, "a").count(), 2);
        assert_eq!(items(&v, "b").count(), 0);
        assert_eq!(items(&v, "c").count(), 0);
        assert_eq!(items(&json!([1]), "a").count(), 0);
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for bad in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"tools":[],"x":1,"tools":[{"a":1}]}"#,
            br#"{"messages":[{"role":"user","role":"system"}]}"#,
            br#"{"model":"a","mod\u0065l":"b"}"#,
        ] {
            let e = parse_strict(bad).unwrap_err().to_string();
            assert!(e.contains("duplicate key"), "{e}");
        }
    }

    #[test]
    fn parses_like_serde_json_otherwise() {
        let text = br#" {"a":[1,-2,3.5,1e400000000,null,true,"s\u00e9"],"b":{"c":{}}} "#;
        assert!(parse_strict(text).is_err(), "infinite numbers are refused");
        let text = br#" {"a":[1,-2,3.5,18446744073709551616,null,true,"s\u00e9"],"b":{"c":{}}} "#;
        let strict = parse_strict(text).unwrap();
        let plain: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(strict, plain);
        assert!(parse_strict(b"{} x").is_err(), "trailing data");
        assert!(parse_strict(b"{").is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse_strict(deep.as_bytes()).is_err(), "nesting is bounded");
    }

    #[test]
    fn set_creates_objects_and_never_panics() {
        let mut v = json!({"stream_options": null});
        assert!(set(
            &mut v,
            &["stream_options", "include_usage"],
            json!(true)
        ));
        assert_eq!(v, json!({"stream_options": {"include_usage": true}}));
        let mut v = json!({"stream_options": "x"});
        assert!(!set(
            &mut v,
            &["stream_options", "include_usage"],
            json!(true)
        ));
        assert_eq!(v, json!({"stream_options": "x"}));
        let mut v = json!([1]);
        assert!(!set(&mut v, &["a"], json!(1)));
        let mut v = json!(5);
        assert!(array_mut(&mut v, "choices").is_none());
    }
}
