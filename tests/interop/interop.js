#!/usr/bin/env node
'use strict';
/*
 * PouchDB 9 interop scenarios against a CouchDB-protocol server (a `ferry serve`).
 *
 *   node interop.js <scenario> --url http://127.0.0.1:PORT [--db NAME] [--n 10000]
 *                   [--user NAME --password PASSWORD]
 *
 * Scenarios: push, pull, live, conflict, filtered. Each asserts its own expectations, prints
 * one line `RESULT {json}` and exits 0, or prints the failure on stderr and exits 1. Local
 * databases use PouchDB's memory adapter. Only loopback addresses are ever contacted. With
 * --user and --password every request to the server carries HTTP basic auth.
 */
const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-adapter-memory'));

function parseArgs(argv) {
  const args = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) args[argv[i].slice(2)] = argv[++i];
    else args._.push(argv[i]);
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const base = args.url;
if (!base || !/^http:\/\/(127\.0\.0\.1|localhost)(:\d+)?$/.test(base)) {
  console.error('--url must be a loopback http URL such as http://127.0.0.1:5984');
  process.exit(2);
}
const dbName = args.db || 'interop';
const remoteUrl = `${base}/${dbName}`;
const N = Number(args.n || 10000);
const auth = args.user ? { username: args.user, password: args.password || '' } : undefined;
const authHeader = auth
  ? { authorization: `Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}` }
  : {};
/** The server database, as PouchDB sees it. */
const remote = () => new PouchDB(remoteUrl, { auth });

let localCounter = 0;
const localDb = () => new PouchDB(`local-${process.pid}-${localCounter++}`, { adapter: 'memory' });

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function http(method, path, body) {
  const response = await fetch(`${remoteUrl}${path}`, {
    method,
    headers: { 'content-type': 'application/json', ...authHeader },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** Polls `probe` until it returns a truthy value or `ms` pass. */
async function until(probe, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value) return value;
    check(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function makeDoc(i) {
  return {
    _id: `todo-${String(i).padStart(7, '0')}`,
    title: `Todo item ${i}: buy milk, call the plumber, write the weekly report`,
    done: i % 3 === 0,
    tags: ['home', 'errand', `p${i % 5}`],
    n: i,
  };
}

const scenarios = {
  /** N documents created locally, replicated to the server, checked over plain HTTP. */
  async push() {
    const local = localDb();
    for (let start = 0; start < N; start += 1000) {
      const docs = [];
      for (let i = start; i < Math.min(N, start + 1000); i++) docs.push(makeDoc(i));
      await local.bulkDocs(docs);
    }
    const started = Date.now();
    const result = await local.replicate.to(remote(), { batch_size: 100 });
    const ms = Date.now() - started;
    check(result.ok && result.docs_written === N, `push wrote ${result.docs_written} of ${N}`);
    const info = await http('GET', '');
    check(info.body.doc_count === N, `server holds ${info.body.doc_count} documents, expected ${N}`);
    for (const i of [0, Math.floor(N / 2), N - 1]) {
      const expected = makeDoc(i);
      const { body } = await http('GET', `/${expected._id}`);
      for (const key of Object.keys(expected)) {
        check(JSON.stringify(body[key]) === JSON.stringify(expected[key]), `${expected._id}.${key} differs on the server`);
      }
    }
    return { docs: N, ms, docs_per_s: Math.round((N * 1000) / ms) };
  },

  /** The N documents of a previous push, replicated into an empty local database. */
  async pull() {
    const local = localDb();
    const started = Date.now();
    const result = await local.replicate.from(remote(), { batch_size: 100 });
    const ms = Date.now() - started;
    check(result.ok && result.docs_written === N, `pull wrote ${result.docs_written} of ${N}`);
    const all = await local.allDocs({ include_docs: true });
    check(all.rows.length === N, `local holds ${all.rows.length} documents`);
    for (const row of all.rows) {
      check(row.doc.n === Number(row.id.slice(5)), `${row.id} has the wrong body`);
    }
    return { docs: all.rows.length, ms, docs_per_s: Math.round((N * 1000) / ms) };
  },

  /** Live two-way sync: a server write reaches PouchDB, a PouchDB write reaches the server. */
  async live() {
    const local = localDb();
    await http('PUT', '');
    const sync = local.sync(remote(), { live: true, retry: true });
    try {
      let started = Date.now();
      const put = await http('PUT', '/from-server', { v: 1 });
      check(put.status === 201, `PUT on the server answered ${put.status}`);
      await until(() => local.get('from-server').then(() => true, () => false), 20000, 'the server change');
      const serverToLocal = Date.now() - started;
      started = Date.now();
      await local.put({ _id: 'from-pouchdb', v: 2 });
      await until(async () => (await http('GET', '/from-pouchdb')).status === 200, 20000, 'the PouchDB change');
      const localToServer = Date.now() - started;
      return { server_to_local_ms: serverToLocal, local_to_server_ms: localToServer };
    } finally {
      sync.cancel();
    }
  },

  /**
   * Two PouchDB replicas edit the same documents offline, then sync through the server. Every
   * replica must pick the same winner and list the same conflict.
   */
  async conflict() {
    const D = Number(args.docs || 20);
    const seed = localDb();
    const docs = [];
    for (let i = 0; i < D; i++) docs.push({ _id: `c-${i}`, v: 0 });
    await seed.bulkDocs(docs);
    await seed.replicate.to(remote());
    const [a, b] = [localDb(), localDb()];
    await a.replicate.from(remote());
    await b.replicate.from(remote());
    for (const [db, who] of [[a, 'A'], [b, 'B']]) {
      const all = await db.allDocs({ include_docs: true });
      await db.bulkDocs(all.rows.map((row) => ({ ...row.doc, v: who })));
    }
    await a.replicate.to(remote());
    await b.replicate.to(remote());
    await a.replicate.from(remote());
    await b.replicate.from(remote());
    let agree = 0;
    let oneConflict = 0;
    const winners = { A: 0, B: 0 };
    for (let i = 0; i < D; i++) {
      const id = `c-${i}`;
      const fromA = await a.get(id, { conflicts: true });
      const fromB = await b.get(id, { conflicts: true });
      const fromServer = (await http('GET', `/${id}?conflicts=true`)).body;
      const shape = (doc) => JSON.stringify([doc._rev, (doc._conflicts || []).slice().sort(), doc.v]);
      if (shape(fromA) === shape(fromB) && shape(fromB) === shape(fromServer)) agree++;
      if ((fromServer._conflicts || []).length === 1) oneConflict++;
      winners[fromServer.v]++;
    }
    check(agree === D, `${D - agree} documents have different winners or conflicts across replicas`);
    check(oneConflict === D, `${D - oneConflict} documents do not have exactly one conflict`);
    return { docs: D, agree, docs_with_one_conflict: oneConflict, winners };
  },

  /**
   * Conflicts made by two PouchDB replicas in a collection the server merges (run the server
   * with --conflict-policy todos=merge): after syncing, no replica has a conflict and every one
   * holds the merge of both edits, which touched different fields.
   */
  async resolved() {
    const D = Number(args.docs || 10);
    const seed = localDb();
    const docs = [];
    for (let i = 0; i < D; i++) docs.push({ _id: `todos:${i}`, title: `todo ${i}`, done: false });
    await seed.bulkDocs(docs);
    await seed.replicate.to(remote());
    const [a, b] = [localDb(), localDb()];
    await a.replicate.from(remote());
    await b.replicate.from(remote());
    const editAll = async (db, change) => {
      const all = await db.allDocs({ include_docs: true });
      await db.bulkDocs(all.rows.map((row) => ({ ...row.doc, ...change(row.doc) })));
    };
    await editAll(a, (doc) => ({ title: `${doc.title} (renamed by A)` }));
    await editAll(b, () => ({ done: true }));
    await a.replicate.to(remote());
    await b.replicate.to(remote());
    await a.replicate.from(remote());
    await b.replicate.from(remote());
    let merged = 0;
    for (let i = 0; i < D; i++) {
      const id = `todos:${i}`;
      const versions = [
        await a.get(id, { conflicts: true }),
        await b.get(id, { conflicts: true }),
        (await http('GET', `/${encodeURIComponent(id)}?conflicts=true`)).body,
      ];
      const shapes = versions.map((doc) => JSON.stringify([doc._rev, doc._conflicts || [], doc.title, doc.done]));
      check(new Set(shapes).size === 1, `${id} differs across replicas: ${shapes.join(' | ')}`);
      const [doc] = versions;
      check(!doc._conflicts, `${id} still has conflicts ${doc._conflicts}`);
      if (doc.title === `todo ${i} (renamed by A)` && doc.done === true) merged++;
    }
    check(merged === D, `${D - merged} documents did not keep both edits`);
    const record = (await http('GET', `/_ferry/resolutions/${encodeURIComponent('todos:0')}`)).body;
    check(record.resolutions.length === 1 && record.resolutions[0].policy === 'merge',
      `resolution record: ${JSON.stringify(record)}`);
    return { docs: D, merged, method: record.resolutions[0].method };
  },

  /** Replication filtered by doc_ids and by a Mango selector. */
  async filtered() {
    const seed = localDb();
    const docs = [];
    for (let i = 0; i < 50; i++) docs.push({ _id: `f-${String(i).padStart(2, '0')}`, n: i });
    await seed.bulkDocs(docs);
    await seed.replicate.to(remote());
    const byIds = localDb();
    await byIds.replicate.from(remote(), { doc_ids: ['f-03', 'f-40'] });
    const ids = (await byIds.allDocs()).rows.map((row) => row.id);
    check(JSON.stringify(ids) === JSON.stringify(['f-03', 'f-40']), `doc_ids replicated ${ids}`);
    const bySelector = localDb();
    await bySelector.replicate.from(remote(), { selector: { n: { $gte: 45 } } });
    const selected = (await bySelector.allDocs()).rows.map((row) => row.id);
    check(selected.length === 5 && selected[0] === 'f-45', `selector replicated ${selected}`);
    return { ok: true, by_doc_ids: ids.length, by_selector: selected.length };
  },

  /**
   * Authentication as browsers and PouchDB apps do it: no credentials is a 401; a cookie
   * login with POST /_session; replication that sends only the cookie; logout ends it.
   */
  async session() {
    check(auth, 'the session scenario needs --user and --password');
    const anonymous = await fetch(`${remoteUrl}/`);
    check(anonymous.status === 401, `without credentials: ${anonymous.status}`);
    const login = await fetch(`${base}/_session`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: auth.username, password: auth.password }),
    });
    check(login.status === 200, `login answered ${login.status}`);
    const cookie = (login.headers.get('set-cookie') || '').split(';')[0];
    check(cookie.startsWith('AuthSession='), `no session cookie: ${cookie}`);
    const who = await (await fetch(`${base}/_session`, { headers: { cookie } })).json();
    check(who.userCtx.name === auth.username, `_session says ${JSON.stringify(who)}`);
    const withCookie = new PouchDB(remoteUrl, {
      fetch: (url, options) => {
        options.headers.set('cookie', cookie);
        return PouchDB.fetch(url, options);
      },
    });
    const local = localDb();
    await local.put({ _id: 'via-cookie', n: 1 });
    const pushed = await local.replicate.to(withCookie);
    check(pushed.docs_written === 1, `pushed ${pushed.docs_written}`);
    const logout = await fetch(`${base}/_session`, { method: 'DELETE', headers: { cookie } });
    check(logout.status === 200, `logout answered ${logout.status}`);
    const after = await fetch(`${remoteUrl}/via-cookie`, { headers: { cookie } });
    check(after.status === 401, `after logout: ${after.status}`);
    const wrong = await fetch(`${remoteUrl}/`, {
      headers: { authorization: `Basic ${Buffer.from(`${auth.username}:nope`).toString('base64')}` },
    });
    check(wrong.status === 401, `wrong password: ${wrong.status}`);
    return { ok: true, user: who.userCtx.name };
  },
};

const scenario = scenarios[args._[0]];
if (!scenario) {
  console.error(`unknown scenario ${args._[0]}; use one of ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
scenario().then(
  (result) => {
    console.log('RESULT ' + JSON.stringify(result));
    process.exit(0);
  },
  (error) => {
    console.error(`scenario ${args._[0]} failed: ${error && error.stack ? error.stack : error}`);
    process.exit(1);
  },
);
