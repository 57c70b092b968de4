// Open a study in the OHIF viewer (served by examples/serve_ohif.py) in headless Chromium, load
// the KLIP SEG and Parametric Map over the source series, and take screenshots: the source alone,
// the source with the SEG, the source with the PM. Used by tests/test_viewer_ohif.py and
// examples/review_in_ohif.sh.
//
//   node examples/ohif_screenshots.mjs job.json
//
// job.json: {"viewer": "http://127.0.0.1:PORT", "study": UID, "source": series UID, "seg": series UID,
//            "pm": series UID, "points": [[x, y, z] x 3] (LPS mm: the centres of voxels (0,0), (W-1,0),
//            (0,H-1) of the slice to show), "out": folder, "chromium": "/usr/bin/chromium",
//            "playwright": "<path to playwright-core/index.mjs>", "user_data_dir": a fresh folder (optional)}
// Writes OUT/source.png, OUT/seg.png, OUT/pm.png and OUT/shots.json: for each shot the canvas
// rectangle in the screenshot, the canvas position of the three points, the viewport type and the
// image shown, so the caller can map source voxels to screenshot pixels.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = await import(job.playwright);
const TIMEOUT = job.timeout_ms ?? 90000;
const log = (...a) => console.log('[ohif]', ...a);

const userDataDir = job.user_data_dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'klip-ohif-chromium-'));
fs.mkdirSync(userDataDir, { recursive: true });
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: job.chromium ?? '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1280, height: 800 },
  deviceScaleFactor: 1,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const problems = [];
// OHIF's first-visit tour would dim the viewport: mark it as shown
await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));

async function openStudy() {
  const page = await context.newPage();
  page.on('pageerror', e => problems.push(`pageerror: ${e.message.slice(0, 300)}`));
  page.on('console', m => {
    if (m.type() === 'error') problems.push(`console: ${m.text().slice(0, 300)}`);
  });
  await page.goto(`${job.viewer}/viewer?StudyInstanceUIDs=${job.study}`);
  await page.waitForFunction(uids => {
    const s = window.services;
    if (!s) return false;
    const series = new Set(s.displaySetService.getActiveDisplaySets().map(d => d.SeriesInstanceUID));
    return uids.every(u => series.has(u));
  }, [job.source, job.seg, job.pm], { timeout: TIMEOUT });
  // the layout is ready: an active viewport with a cornerstone element
  await page.waitForFunction(() => window.services.viewportGridService.getActiveViewportId() &&
    window.cornerstone.getEnabledElements().length > 0, null, { timeout: TIMEOUT });
  return page;
}

async function show(page, series) {
  await page.evaluate(uid => {
    const { displaySetService, viewportGridService } = window.services;
    const ds = displaySetService.getActiveDisplaySets().find(d => d.SeriesInstanceUID === uid);
    const viewportId = viewportGridService.getActiveViewportId();
    viewportGridService.setDisplaySetsForViewport({ viewportId, displaySetInstanceUIDs: [ds.displaySetInstanceUID] });
  }, series);
}

async function settle(page, ms = 2500) {
  await page.waitForTimeout(ms);
  await page.waitForFunction(() => {
    const el = window.cornerstone.getEnabledElements()[0];
    return el && el.viewport && el.viewport.getRenderingEngine() && !document.querySelector('.loading-indicator');
  }, null, { timeout: TIMEOUT });
}

// Scroll the viewport to the slice through job.points[0] and report the geometry of the shot.
async function goToSliceAndMeasure(page) {
  return await page.evaluate(async points => {
    const cs = window.cornerstone;
    const enabled = cs.getEnabledElements()[0];
    const vp = enabled.viewport;
    const sub = (a, b) => a.map((v, i) => v - b[i]);
    const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);
    const distance = () => {
      const cam = vp.getCamera();
      return Math.abs(dot(sub(cam.focalPoint, points[0]), cam.viewPlaneNormal));
    };
    const n = vp.getNumberOfSlices ? vp.getNumberOfSlices() : vp.getImageIds().length;
    let best = [Infinity, 0];
    for (let i = 0; i < n; i++) {
      await cs.utilities.jumpToSlice(vp.element, { imageIndex: i });
      vp.render();
      await new Promise(r => setTimeout(r, 300));  // the camera follows the jump asynchronously
      const d = distance();
      if (d < best[0]) best = [d, i];
    }
    await cs.utilities.jumpToSlice(vp.element, { imageIndex: best[1] });
    vp.render();
    await new Promise(r => setTimeout(r, 1500));
    const canvas = vp.getCanvas ? vp.getCanvas() : vp.canvas;
    const rect = canvas.getBoundingClientRect();
    return {
      viewportType: vp.type,
      sliceIndex: best[1],
      slices: n,
      distanceMm: distance(),
      canvas: [rect.left, rect.top, rect.width, rect.height],
      points: points.map(p => vp.worldToCanvas(p)),
      actors: vp.getActors().map(a => a.uid),
      devicePixelRatio: window.devicePixelRatio,
    };
  }, job.points);
}

const shots = {};
try {
  // 1. the source alone; 2. the SEG over it (OHIF asks before hydrating: "Yes")
  let page = await openStudy();
  await show(page, job.source);
  await settle(page);
  shots.source = await goToSliceAndMeasure(page);
  await page.screenshot({ path: path.join(job.out, 'source.png') });
  log('source', JSON.stringify(shots.source));

  await show(page, job.seg);
  const yes = page.locator('[data-cy="yes-hydrate-btn"]');
  await yes.waitFor({ timeout: TIMEOUT });
  await yes.evaluate(button => button.click()); // the prompt overlays the canvas; a DOM click is enough
  await page.waitForFunction(() => {
    const seg = window.services.segmentationService;
    return seg.getSegmentations().length > 0;
  }, null, { timeout: TIMEOUT });
  await settle(page, 4000);
  shots.seg = await goToSliceAndMeasure(page);
  shots.seg.segmentations = await page.evaluate(() =>
    window.services.segmentationService.getSegmentations().map(s => s.label ?? s.segmentationId));
  await page.screenshot({ path: path.join(job.out, 'seg.png') });
  log('seg', JSON.stringify(shots.seg));
  await page.close();

  // 3. the Parametric Map (OHIF shows it in a volume viewport over the referenced series)
  page = await openStudy();
  await show(page, job.pm);
  await page.waitForFunction(() => {
    const vp = window.cornerstone.getEnabledElements()[0]?.viewport;
    return vp && vp.getActors && vp.getActors().length >= 2;
  }, null, { timeout: TIMEOUT });
  await settle(page, 4000);
  shots.pm = await goToSliceAndMeasure(page);
  await page.screenshot({ path: path.join(job.out, 'pm.png') });
  log('pm', JSON.stringify(shots.pm));
  await page.close();
} catch (err) {
  problems.push(`driver: ${err.message.slice(0, 500)}`);
  process.exitCode = 1;
} finally {
  fs.writeFileSync(path.join(job.out, 'shots.json'), JSON.stringify({ shots, problems }, null, 1));
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
