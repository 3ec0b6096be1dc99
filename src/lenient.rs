//! JSON objects read the way most JSON parsers (and so the upstream APIs) read them.
//!
//! `#[derive(Deserialize)]` refuses an object that repeats a field (`{"user":"a","user":"b"}`),
//! while JavaScript, Python and Go keep the last value. Metering with the derive would turn such
//! a body into "not JSON" (a request billed to the fallback subject, a response not billed),
//! though the upstream served it. [`lenient_struct!`] defines a struct whose fields are read
//! last-wins, unknown members skipped without being built, `null` read as absent.

/// Defines a struct of `Option<T>` fields read from a JSON object, last duplicate winning:
/// `lenient_struct! { struct Top { model: Value = "model", usage: Usage = "usage" } }`.
macro_rules! lenient_struct {
    ($vis:vis struct $name:ident { $($field:ident: $ty:ty = $key:literal),* $(,)? }) => {
        $vis struct $name {
            $($field: Option<$ty>,)*
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Fields;

                impl<'de> serde::de::Visitor<'de> for Fields {
                    type Value = $name;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }

                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        $(let mut $field: Option<$ty> = None;)*
                        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                            match &*key {
                                $($key => $field = map.next_value::<Option<$ty>>()?,)*
                                _ => {
                                    map.next_value::<serde::de::IgnoredAny>()?;
                                }
                            }
                        }
                        Ok($name { $($field,)* })
                    }
                }

                deserializer.deserialize_map(Fields)
            }
        }
    };
}

pub(crate) use lenient_struct;

#[cfg(test)]
mod tests {
    use serde_json::Value;

    lenient_struct! {
        struct Top { user: Value = "user", kind: Value = "type", inner: Inner = "inner" }
    }
    lenient_struct! {
        struct Inner { n: u64 = "n" }
    }

    #[test]
    fn last_duplicate_wins_and_unknown_members_are_skipped() {
        let top: Top = serde_json::from_str(
            r#"{"user":"a","x":{"deep":[1,2,{"y":null}]},"user":"b","type":1,"inner":{"n":1,"n":2}}"#,
        )
        .unwrap();
        assert_eq!(top.user, Some(Value::from("b")));
        assert_eq!(top.kind, Some(Value::from(1)));
        assert_eq!(top.inner.and_then(|i| i.n), Some(2));
    }

    #[test]
    fn null_is_absent_and_non_objects_are_errors() {
        let top: Top = serde_json::from_str(r#"{"user":null,"inner":null}"#).unwrap();
        assert!(top.user.is_none() && top.inner.is_none());
        for bad in ["[1]", "1", "\"s\"", "null", r#"{"inner":"s"}"#, r#"{"user":1"#] {
            assert!(serde_json::from_str::<Top>(bad).is_err(), "{bad}");
        }
    }
}
