//! The module layering issue 13 asked for, checked on the source: the
//! destinations (queue, topic) know nothing of the session that feeds them
//! (they answer through `outbound::Outbound`), and logins (`auth`) know
//! nothing of the configuration or the security model that use them. A
//! `crate::` path in non-test code that breaks this fails here, naming the
//! file and the path.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeSet;

/// The `crate::MODULE` names `file` refers to outside its tests module.
fn refers_to(file: &str) -> BTreeSet<String> {
    let path = format!("{}/src/{file}.rs", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if rest[name.len()..].starts_with("::") || rest[name.len()..].starts_with("::{") {
            out.insert(name);
        }
    }
    // `use crate::{a, b}` forms.
    for (i, _) in code.match_indices("use crate::{") {
        let list = &code[i + "use crate::{".len()..];
        let list = &list[..list.find('}').unwrap()];
        out.extend(list.split(',').map(|m| m.trim().split("::").next().unwrap().to_owned()));
    }
    out
}

#[test]
fn destinations_and_logins_do_not_reach_back() {
    let forbidden = [
        ("queue", "session"),
        ("topic", "session"),
        ("outbound", "session"),
        ("outbound", "queue"),
        ("outbound", "topic"),
        ("auth", "config"),
        ("auth", "security"),
        ("security", "config"),
    ];
    let mut found = Vec::new();
    for (from, to) in forbidden {
        if refers_to(from).contains(to) {
            found.push(format!("broker/src/{from}.rs uses crate::{to}"));
        }
    }
    assert!(found.is_empty(), "{found:#?}");
    // The check sees what it should: the session does use the queue.
    assert!(refers_to("session").contains("queue") && refers_to("config").contains("security"));
}
