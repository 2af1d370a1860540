// Checks the built documentation site in a real headless browser: `node tools/docs/check_site.mjs SITE_DIR`.
//
// It serves SITE_DIR (what `mkdocs build` wrote) on 127.0.0.1, opens every page in Chromium (Debian's, at
// $CHROMIUM or /usr/bin/chromium, driven by playwright-core), and fails on a console error, an uncaught
// exception, a failed or 4xx/5xx request, or an image that did not load (naturalWidth 0). Then it types
// queries into the search box and expects results that link to the right pages. Exit status 0 when all
// holds, 1 with every problem listed otherwise.
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { extname, join, normalize, relative, resolve, sep } from "node:path";
import { chromium } from "playwright-core";

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".css": "text/css",
  ".json": "application/json",
  ".png": "image/png",
  ".svg": "image/svg+xml",
  ".ico": "image/x-icon",
  ".xml": "application/xml",
  ".inv": "application/octet-stream",
  ".gz": "application/gzip",
  ".woff2": "font/woff2",
};
// Each query, and a page that its results must include (the page where the words are explained).
const SEARCHES = [
  ["inpainting", "editing/"],
  ["classifier-free guidance", "guidance/"],
  ["adam_betas", "reference/config/"],
  ["load_pretrained", "api/io/"],
];

const site = resolve(process.argv[2] ?? "site");
const problems = [];

function pages(folder) {
  const found = [];
  for (const name of readdirSync(folder)) {
    const path = join(folder, name);
    if (statSync(path).isDirectory()) found.push(...pages(path));
    else if (name === "index.html") found.push(relative(site, folder).split(sep).join("/"));
  }
  return found;
}

function serve() {
  const server = createServer((request, response) => {
    let path = normalize(join(site, decodeURIComponent(new URL(request.url, "http://x").pathname)));
    if (!path.startsWith(site)) path = join(site, "404.html");
    try {
      if (statSync(path).isDirectory()) path = join(path, "index.html");
      const body = readFileSync(path);
      response.writeHead(200, { "content-type": TYPES[extname(path)] ?? "application/octet-stream" });
      response.end(body);
    } catch {
      response.writeHead(404, { "content-type": "text/plain" });
      response.end("not found");
    }
  });
  return new Promise((done) => server.listen(0, "127.0.0.1", () => done(server)));
}

async function checkPage(context, base, page) {
  const tab = await context.newPage();
  const where = `/${page}${page ? "/" : ""}`;
  tab.on("console", (message) => {
    if (message.type() === "error") problems.push(`${where}: console error: ${message.text()}`);
  });
  tab.on("pageerror", (error) => problems.push(`${where}: uncaught: ${error.message}`));
  tab.on("requestfailed", (request) =>
    problems.push(`${where}: request failed: ${request.url()} (${request.failure()?.errorText})`),
  );
  tab.on("response", (response) => {
    if (response.status() >= 400) problems.push(`${where}: ${response.status()} for ${response.url()}`);
  });
  const response = await tab.goto(base + where, { waitUntil: "load" });
  if (!response?.ok()) problems.push(`${where}: the page answered ${response?.status()}`);
  const title = await tab.locator("article h1").first().textContent({ timeout: 5000 }).catch(() => null);
  if (!title) problems.push(`${where}: no h1 heading in the article`);
  const images = await tab.$$eval("img", (all) =>
    all.map((img) => ({ src: img.getAttribute("src"), ok: img.complete && img.naturalWidth > 0 })),
  );
  for (const image of images.filter((image) => !image.ok)) {
    problems.push(`${where}: image did not load: ${image.src}`);
  }
  await tab.close();
  return images.length;
}

async function checkSearch(context, base) {
  const tab = await context.newPage();
  await tab.goto(`${base}/`, { waitUntil: "load" });
  const found = [];
  for (const [query, page] of SEARCHES) {
    await tab.locator("label.md-search__icon, .md-search__input").first().click();
    const box = tab.locator("input.md-search__input");
    await box.fill("");
    await box.pressSequentially(query, { delay: 20 });
    const results = tab.locator(".md-search-result__item a");
    try {
      await results.first().waitFor({ timeout: 15000 });
    } catch {
      problems.push(`search "${query}": no results`);
      continue;
    }
    const links = await results.evaluateAll((all) => all.map((a) => new URL(a.href).pathname));
    if (!links.some((link) => link.includes(`/${page}`))) {
      problems.push(`search "${query}": no result on ${page} (got ${links.slice(0, 5).join(", ")})`);
    }
    found.push(`"${query}": ${links.length} results`);
    await tab.keyboard.press("Escape");
  }
  await tab.close();
  return found;
}

const all = pages(site);
if (all.length === 0) {
  console.error(`error: no index.html under ${site}: build the site first (mkdocs build)`);
  process.exit(1);
}
const server = await serve();
const base = `http://127.0.0.1:${server.address().port}`;
const profile = mkdtempSync(join(tmpdir(), "ddpm-docs-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let images = 0;
let searches = [];
try {
  for (const page of all) images += await checkPage(context, base, page);
  searches = await checkSearch(context, base);
} finally {
  await context.close();
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
if (images === 0) problems.push("no image on any page: the check of images checked nothing");
console.log(`${all.length} pages loaded, ${images} images checked; search ${searches.join(", ")}`);
if (problems.length) {
  console.error(`${problems.length} problems:\n${problems.join("\n")}`);
  process.exit(1);
}
console.log("the site passed the browser check");
