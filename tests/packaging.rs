//! What a package ships, checked with the tools that will read it: the
//! systemd unit under `systemd-analyze verify`, the man page under `man -l`,
//! shell completions under `bash -n`.

mod common;

use common::have;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn privlink(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_privlink")).args(args).output().expect("privlink");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("plpkg{}{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("man/man1")).expect("dir");
    d
}

#[test]
fn the_man_page_renders_and_names_every_command() {
    if !have("man") {
        return;
    }
    let d = temp("man");
    let page = d.join("man/man1/privlink.1");
    std::fs::write(&page, privlink(&["man"])).expect("write");
    let out =
        Command::new("man").arg("-l").arg(&page).env("MANPAGER", "cat").env("MANWIDTH", "100").output().expect("man");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("privlink - A userspace private-link dataplane"), "{text}");
    for cmd in ["run", "check", "demo", "connections", "status", "flows"] {
        assert!(text.contains(cmd), "the man page names `{cmd}`:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bash_completions_parse_and_complete_the_subcommands() {
    let script = privlink(&["completions", "bash"]);
    let mut sh = Command::new("bash").arg("-n").stdin(Stdio::piped()).spawn().expect("bash");
    {
        use std::io::Write;
        sh.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write");
    }
    assert!(sh.wait().expect("bash").success(), "bash -n refuses the completion script");
    assert!(script.contains("complete -F _privlink"));
    for cmd in ["run", "check", "connections", "flows", "--takeover"] {
        assert!(script.contains(cmd), "completes `{cmd}`");
    }
    for shell in ["zsh", "fish"] {
        assert!(privlink(&["completions", shell]).contains("privlink"), "{shell}");
    }
}

#[test]
fn systemd_accepts_the_unit() {
    if !have("systemd-analyze") || !have("man") {
        return;
    }
    // The unit as installed, with /usr/bin/privlink pointing at this build,
    // and the man page its Documentation= names where man finds it.
    let d = temp("unit");
    let unit = std::fs::read_to_string(repo("config/privlink.service")).expect("unit");
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=") && unit.contains("CapabilityBoundingSet="));
    let unit = unit.replace("/usr/bin/privlink", env!("CARGO_BIN_EXE_privlink"));
    std::fs::write(d.join("privlink.service"), unit).expect("write");
    std::fs::write(d.join("man/man1/privlink.1"), privlink(&["man"])).expect("man page");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(d.join("privlink.service"))
        .env("MANPATH", d.join("man"))
        .output()
        .expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("privlink.service"), "systemd-analyze verify: {text}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_debian_package_holds_what_it_should_and_its_scripts_parse() {
    // Built by tests/run.sh (config/debian/build-deb) before the tests.
    let dir = repo("target/debian");
    let deb = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let Some(deb) = deb else {
        assert!(std::env::var_os("CI").is_none(), "CI is set but there is no package in {}", dir.display());
        eprintln!("skipped: no package (run config/debian/build-deb)");
        return;
    };
    if !have("dpkg-deb") {
        return;
    }
    let run = |args: &[&str]| -> String {
        let out = Command::new("dpkg-deb").args(args).arg(&deb).output().expect("dpkg-deb");
        assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let contents = run(&["-c"]);
    for path in [
        "./usr/bin/privlink",
        "./lib/systemd/system/privlink.service",
        "./usr/share/man/man1/privlink.1.gz",
        "./usr/share/bash-completion/completions/privlink",
        "./usr/share/doc/privlink/examples/privlink.toml",
        "./usr/share/doc/privlink/prometheus/alerts.yml",
        "./usr/share/doc/privlink/grafana/privlink-dashboard.json",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "the package holds {path}:\n{contents}");
    }
    assert!(contents.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("./usr/bin/privlink")));
    let out = Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Package", "Depends"]).output().expect("dpkg-deb");
    let fields = String::from_utf8_lossy(&out.stdout);
    assert!(fields.contains("Package: privlink") && fields.contains("iproute2"), "{fields}");

    let d = temp("deb");
    let (control, root) = (d.join("control"), d.join("root"));
    let ok = |c: &mut Command| assert!(c.status().expect("run").success(), "{c:?}");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        let p = control.join(script);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap_or_else(|_| panic!("{script} in the package")).permissions().mode();
        assert!(mode & 0o111 != 0, "{script} is executable");
        ok(Command::new("sh").arg("-n").arg(&p));
    }
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let v = Command::new(root.join("usr/bin/privlink")).arg("--version").output().expect("packaged binary");
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(
        std::fs::read_to_string(root.join("lib/systemd/system/privlink.service")).expect("unit"),
        std::fs::read_to_string(repo("config/privlink.service")).expect("unit")
    );
    if have("man") {
        let out = Command::new("man")
            .arg("-l")
            .arg(root.join("usr/share/man/man1/privlink.1.gz"))
            .env("MANPAGER", "cat")
            .output()
            .expect("man");
        assert!(String::from_utf8_lossy(&out.stdout).contains("privlink - A userspace private-link dataplane"));
    }
    let _ = std::fs::remove_dir_all(&d);
}
