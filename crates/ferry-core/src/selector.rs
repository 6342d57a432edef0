//! Mango selectors (CouchDB's query language), evaluated against JSON documents.
//!
//! Used by the `_changes` feed's `_selector` filter and by collection queries. Supported:
//! implicit and explicit `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`, `$in`, `$nin`, `$exists`,
//! `$type`, `$size`, `$all`, `$elemMatch`, `$and`, `$or`, `$nor`, `$not`, nested objects and
//! dotted field paths. `$regex` and `$mod` are refused with an error rather than ignored, so a
//! filter never silently lets through documents it was meant to hold back.
//!
//! Values compare in CouchDB's collation order: null < false < true < numbers < strings <
//! arrays < objects; strings compare by Unicode code point (CouchDB uses ICU collation, which
//! differs for some non-ASCII text).

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// A parsed selector.
#[derive(Clone, Debug, PartialEq)]
pub enum Selector {
    /// Every sub-selector matches.
    And(Vec<Selector>),
    /// At least one sub-selector matches.
    Or(Vec<Selector>),
    /// No sub-selector matches.
    Nor(Vec<Selector>),
    /// The sub-selector does not match.
    Not(Box<Selector>),
    /// A condition on the value at a field path.
    Field {
        /// The path, split at dots.
        path: Vec<String>,
        /// The condition.
        condition: Condition,
    },
}

/// A condition on one field's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Equal to the value.
    Eq(Value),
    /// Not equal (a missing field is not equal).
    Ne(Value),
    /// Greater than.
    Gt(Value),
    /// Greater than or equal.
    Gte(Value),
    /// Less than.
    Lt(Value),
    /// Less than or equal.
    Lte(Value),
    /// Equal to one of the values.
    In(Vec<Value>),
    /// Equal to none of the values.
    Nin(Vec<Value>),
    /// The field exists (or not).
    Exists(bool),
    /// The value's JSON type: null, boolean, number, string, array or object.
    Type(String),
    /// An array of this length.
    Size(u64),
    /// An array containing all the values.
    All(Vec<Value>),
    /// An array with an element matching the selector (which applies to the element itself).
    ElemMatch(Box<Selector>),
    /// All conditions hold.
    AllOf(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
}

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector: {0}")]
pub struct SelectorError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, SelectorError> {
    Err(SelectorError(message.into()))
}

impl Selector {
    /// Parses a selector from its JSON form.
    ///
    /// ```
    /// use ferry_core::selector::Selector;
    /// use serde_json::json;
    /// let selector = Selector::parse(&json!({"done": false, "n": {"$gte": 10}})).unwrap();
    /// assert!(selector.matches(&json!({"done": false, "n": 12})));
    /// assert!(!selector.matches(&json!({"done": false, "n": 9})));
    /// ```
    pub fn parse(value: &Value) -> Result<Selector, SelectorError> {
        match value {
            Value::Object(map) => parse_object(&[], map),
            _ => refuse("a selector must be a JSON object"),
        }
    }

    /// A selector matching every document.
    pub fn everything() -> Selector {
        Selector::And(Vec::new())
    }

    /// Whether a stored document's winning revision matches, as CouchDB evaluates a `_selector`
    /// filter: the body with `_id` (and `_deleted: true` for a tombstone) added, so selectors
    /// on ids work and tombstones can be let through on purpose.
    ///
    /// ```
    /// use ferry_core::selector::Selector;
    /// use serde_json::json;
    /// let todos = Selector::parse(&json!({"_id": {"$gt": "todos:", "$lt": "todos;"}})).unwrap();
    /// let body = json!({"title": "milk"}).as_object().unwrap().clone();
    /// assert!(todos.matches_document("todos:1", false, &body));
    /// assert!(!todos.matches_document("notes:1", false, &body));
    /// ```
    pub fn matches_document(&self, doc_id: &str, deleted: bool, body: &Map<String, Value>) -> bool {
        let mut document = body.clone();
        document.insert("_id".into(), Value::String(doc_id.to_owned()));
        if deleted {
            document.insert("_deleted".into(), Value::Bool(true));
        }
        self.matches(&Value::Object(document))
    }

    /// Whether `document` matches.
    pub fn matches(&self, document: &Value) -> bool {
        match self {
            Selector::And(parts) => parts.iter().all(|part| part.matches(document)),
            Selector::Or(parts) => parts.iter().any(|part| part.matches(document)),
            Selector::Nor(parts) => !parts.iter().any(|part| part.matches(document)),
            Selector::Not(inner) => !inner.matches(document),
            Selector::Field { path, condition } => condition.holds(lookup(document, path)),
        }
    }
}

fn parse_object(path: &[String], map: &Map<String, Value>) -> Result<Selector, SelectorError> {
    parse_object_in(path, map, false)
}

/// `bare_operators` allows operators with no field, applying to the value itself (inside
/// `$elemMatch`, where the value is an array element).
fn parse_object_in(
    path: &[String],
    map: &Map<String, Value>,
    bare_operators: bool,
) -> Result<Selector, SelectorError> {
    let mut parts = Vec::with_capacity(map.len());
    for (key, value) in map {
        parts.push(parse_entry(path, key, value, bare_operators)?);
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Selector::And(parts)
    })
}

fn parse_list(value: &Value, operator: &str) -> Result<Vec<Selector>, SelectorError> {
    let Value::Array(items) = value else {
        return refuse(format!("{operator} needs an array of selectors"));
    };
    items.iter().map(Selector::parse).collect()
}

fn parse_entry(
    path: &[String],
    key: &str,
    value: &Value,
    bare_operators: bool,
) -> Result<Selector, SelectorError> {
    match key {
        "$and" => Ok(Selector::And(parse_list(value, key)?)),
        "$or" => Ok(Selector::Or(parse_list(value, key)?)),
        "$nor" => Ok(Selector::Nor(parse_list(value, key)?)),
        "$not" if path.is_empty() => Ok(Selector::Not(Box::new(Selector::parse(value)?))),
        operator if operator.starts_with('$') => {
            if path.is_empty() && !bare_operators {
                return refuse(format!("operator {operator} needs a field"));
            }
            Ok(Selector::Field {
                path: path.to_vec(),
                condition: parse_operator(operator, value)?,
            })
        }
        field => {
            let mut nested = path.to_vec();
            nested.extend(field.split('.').map(str::to_owned));
            match value {
                Value::Object(map) if map.keys().any(|key| key.starts_with('$')) => {
                    let conditions = map
                        .iter()
                        .map(|(operator, operand)| {
                            if operator.starts_with('$') {
                                parse_operator(operator, operand)
                            } else {
                                refuse(format!("cannot mix operators and fields under {field:?}"))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Selector::Field {
                        path: nested,
                        condition: single_or_all(conditions),
                    })
                }
                Value::Object(map) if !map.is_empty() => parse_object(&nested, map),
                _ => Ok(Selector::Field {
                    path: nested,
                    condition: Condition::Eq(value.clone()),
                }),
            }
        }
    }
}

fn single_or_all(mut conditions: Vec<Condition>) -> Condition {
    if conditions.len() == 1 {
        conditions.pop().expect("one condition")
    } else {
        Condition::AllOf(conditions)
    }
}

fn parse_values(value: &Value, operator: &str) -> Result<Vec<Value>, SelectorError> {
    match value {
        Value::Array(items) => Ok(items.clone()),
        _ => refuse(format!("{operator} needs an array")),
    }
}

fn parse_operator(operator: &str, value: &Value) -> Result<Condition, SelectorError> {
    Ok(match operator {
        "$eq" => Condition::Eq(value.clone()),
        "$ne" => Condition::Ne(value.clone()),
        "$gt" => Condition::Gt(value.clone()),
        "$gte" => Condition::Gte(value.clone()),
        "$lt" => Condition::Lt(value.clone()),
        "$lte" => Condition::Lte(value.clone()),
        "$in" => Condition::In(parse_values(value, operator)?),
        "$nin" => Condition::Nin(parse_values(value, operator)?),
        "$all" => Condition::All(parse_values(value, operator)?),
        "$exists" => match value {
            Value::Bool(exists) => Condition::Exists(*exists),
            _ => return refuse("$exists needs true or false"),
        },
        "$type" => match value.as_str() {
            Some(name @ ("null" | "boolean" | "number" | "string" | "array" | "object")) => {
                Condition::Type(name.to_owned())
            }
            _ => return refuse("$type needs null, boolean, number, string, array or object"),
        },
        "$size" => match value.as_u64() {
            Some(size) => Condition::Size(size),
            None => return refuse("$size needs a non-negative integer"),
        },
        "$elemMatch" => Condition::ElemMatch(Box::new(match value {
            Value::Object(map) => parse_object_in(&[], map, true)?,
            _ => return refuse("$elemMatch needs a selector"),
        })),
        "$not" => match value {
            Value::Object(map) => {
                let conditions = map
                    .iter()
                    .map(|(operator, operand)| parse_operator(operator, operand))
                    .collect::<Result<Vec<_>, _>>()?;
                Condition::Not(Box::new(single_or_all(conditions)))
            }
            _ => return refuse("$not needs an object of operators"),
        },
        other => return refuse(format!("operator {other} is not supported")),
    })
}

fn lookup<'a>(document: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(document, |value, key| value.as_object()?.get(key))
}

impl Condition {
    fn holds(&self, value: Option<&Value>) -> bool {
        match self {
            Condition::Exists(expected) => value.is_some() == *expected,
            Condition::Ne(operand) => value.is_none_or(|value| collate(value, operand).is_ne()),
            Condition::Nin(operands) => value.is_none_or(|value| {
                operands
                    .iter()
                    .all(|operand| collate(value, operand).is_ne())
            }),
            Condition::Not(inner) => !inner.holds(value),
            Condition::AllOf(conditions) => conditions.iter().all(|inner| inner.holds(value)),
            _ => value.is_some_and(|value| self.holds_on(value)),
        }
    }

    fn holds_on(&self, value: &Value) -> bool {
        match self {
            Condition::Eq(operand) => collate(value, operand).is_eq(),
            Condition::Gt(operand) => same_kind(value, operand) && collate(value, operand).is_gt(),
            Condition::Gte(operand) => same_kind(value, operand) && collate(value, operand).is_ge(),
            Condition::Lt(operand) => same_kind(value, operand) && collate(value, operand).is_lt(),
            Condition::Lte(operand) => same_kind(value, operand) && collate(value, operand).is_le(),
            Condition::In(operands) => operands
                .iter()
                .any(|operand| collate(value, operand).is_eq()),
            Condition::Type(name) => type_name(value) == name,
            Condition::Size(size) => value
                .as_array()
                .is_some_and(|items| items.len() as u64 == *size),
            Condition::All(operands) => value.as_array().is_some_and(|items| {
                operands
                    .iter()
                    .all(|operand| items.iter().any(|item| collate(item, operand).is_eq()))
            }),
            Condition::ElemMatch(selector) => value
                .as_array()
                .is_some_and(|items| items.iter().any(|item| selector.matches(item))),
            Condition::Exists(_)
            | Condition::Ne(_)
            | Condition::Nin(_)
            | Condition::Not(_)
            | Condition::AllOf(_) => self.holds(Some(value)),
        }
    }
}

/// Range operators compare values of the same JSON type only, as CouchDB's Mango does for
/// indexes: `{"n": {"$gt": 5}}` does not match `"n": "six"`.
fn same_kind(value: &Value, operand: &Value) -> bool {
    type_rank(value) == type_rank(operand) || (value.is_boolean() && operand.is_boolean())
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_rank(value: &Value) -> u8 {
    match value {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    }
}

/// Compares two JSON values in CouchDB's collation order.
pub fn collate(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (left, right) in x.iter().zip(y) {
                let order = collate(left, right);
                if order.is_ne() {
                    return order;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            for ((left_key, left), (right_key, right)) in x.iter().zip(y) {
                let order = left_key.cmp(right_key).then_with(|| collate(left, right));
                if order.is_ne() {
                    return order;
                }
            }
            x.len().cmp(&y.len())
        }
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

fn compare_numbers(x: &serde_json::Number, y: &serde_json::Number) -> Ordering {
    match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
        (Some(a), Some(b), _, _) => a.cmp(&b),
        (_, _, Some(a), Some(b)) => a.cmp(&b),
        _ => {
            let a = x.as_f64().unwrap_or(f64::NAN);
            let b = y.as_f64().unwrap_or(f64::NAN);
            a.partial_cmp(&b).unwrap_or(Ordering::Equal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(selector: Value, document: Value, expected: bool) {
        let parsed = Selector::parse(&selector).unwrap();
        assert_eq!(
            parsed.matches(&document),
            expected,
            "{selector} on {document}"
        );
    }

    #[test]
    fn field_conditions() {
        let doc = json!({"n": 5, "name": "ann", "tags": ["a", "b"], "address": {"city": "Oslo"}});
        check(json!({"n": 5}), doc.clone(), true);
        check(json!({"n": {"$gt": 4, "$lt": 6}}), doc.clone(), true);
        check(json!({"n": {"$gt": 5}}), doc.clone(), false);
        check(json!({"n": {"$gt": "1"}}), doc.clone(), false);
        check(json!({"name": {"$in": ["bob", "ann"]}}), doc.clone(), true);
        check(
            json!({"name": {"$nin": ["bob", "ann"]}}),
            doc.clone(),
            false,
        );
        check(json!({"missing": {"$ne": 1}}), doc.clone(), true);
        check(json!({"missing": {"$exists": false}}), doc.clone(), true);
        check(json!({"address.city": "Oslo"}), doc.clone(), true);
        check(json!({"address": {"city": "Oslo"}}), doc.clone(), true);
        check(json!({"tags": {"$all": ["b", "a"]}}), doc.clone(), true);
        check(json!({"tags": {"$size": 2}}), doc.clone(), true);
        check(
            json!({"tags": {"$elemMatch": {"$eq": "b"}}}),
            doc.clone(),
            true,
        );
        check(json!({"n": {"$type": "number"}}), doc.clone(), true);
        check(json!({"n": {"$not": {"$eq": 5}}}), doc.clone(), false);
    }

    #[test]
    fn combinators() {
        let doc = json!({"a": 1, "b": 2});
        check(json!({"$or": [{"a": 2}, {"b": 2}]}), doc.clone(), true);
        check(json!({"$and": [{"a": 1}, {"b": 3}]}), doc.clone(), false);
        check(json!({"$nor": [{"a": 2}, {"b": 3}]}), doc.clone(), true);
        check(json!({"$not": {"a": 1}}), doc.clone(), false);
        check(json!({}), doc, true);
    }

    #[test]
    fn unsupported_or_malformed_selectors_are_refused() {
        for bad in [
            json!({"a": {"$regex": "x"}}),
            json!({"$gt": 1}),
            json!({"a": {"$in": 1}}),
            json!({"a": {"$exists": 1}}),
            json!({"a": {"$gt": 1, "b": 2}}),
            json!([1]),
        ] {
            assert!(Selector::parse(&bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn collation_follows_couchdb_type_order() {
        let ordered = [
            json!(null),
            json!(false),
            json!(true),
            json!(-1),
            json!(2.5),
            json!(3),
            json!("a"),
            json!("b"),
            json!([1]),
            json!([1, 2]),
            json!({"a": 1}),
        ];
        for pair in ordered.windows(2) {
            assert_eq!(collate(&pair[0], &pair[1]), Ordering::Less, "{pair:?}");
        }
    }
}
