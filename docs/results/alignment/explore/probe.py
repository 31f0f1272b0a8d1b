import sys
from pathlib import Path
import numpy as np, cv2
sys.argv = ['x']
import detection as D
from ferkit.faces import YuNetDetector
det = YuNetDetector()
scenes = D.scene_photos(Path('/work/shared/data/fer2013'), 600)
def roll(lm):
    (rx, ry), (lx, ly) = lm[0], lm[1]
    return np.degrees(np.arctan2(ly - ry, lx - rx))
rows = []
for sc in scenes:
    ups = det.detect(sc['upright']); tis = det.detect(sc['tilted'])
    for kind, dets in (('u', ups), ('t', tis)):
        m, _ = D.matched([d.box for d in dets], sc['centres']['upright' if kind=='u' else 'tilted'], sc['sides'])
        for i, j in enumerate(m):
            if j >= 0:
                d = dets[j]
                rows.append((kind, sc['angle'], sc['sides'][i], max(d.box[2:]), roll(d.landmarks), i, id(sc)))
import collections
u = {(r[6], r[5]): r for r in rows if r[0]=='u'}
t = {(r[6], r[5]): r for r in rows if r[0]=='t'}
print('upright found', len(u), 'tilted found', len(t))
ur = np.array([r[4] for r in u.values()]); print('upright roll abs pct', np.percentile(np.abs(ur), [50, 75, 90, 95, 99]))
both = [k for k in u if k in t]
err = np.array([t[k][4] - u[k][4] - (-t[k][1]) for k in both])
print('tilt roll minus upright roll vs -angle: median', np.median(err), 'p90 abs', np.percentile(np.abs(err), 90))
ratio = np.array([t[k][3] / u[k][3] for k in both]); ang = np.array([abs(t[k][1]) for k in both])
for lo in (15, 20, 25, 30):
    sel = (ang >= lo) & (ang < lo + 5)
    print(lo, 'box side ratio tilted/upright median', np.median(ratio[sel]), sel.sum())
tr = np.array([t[k][4] for k in t]); ta = np.array([t[k][1] for k in t])
print('tilted roll vs angle corr', np.corrcoef(tr, ta)[0,1], np.median(tr + ta))
# per scene: found some but not all in tilted
cnt = collections.Counter(k[0] for k in t)
print('scenes tilted found 3', sum(v==3 for v in cnt.values()), '1-2', sum(v<3 for v in cnt.values()), 'of', len(scenes), 'none', len(scenes)-len(cnt))
print('by angle bin: median tilted roll, iqr, ; upright-roll-corrected')
for lo in (-35, -30, -25, -20, 15, 20, 25, 30):
    sel = [k for k in both if lo <= t[k][1] < lo + 5]
    r = np.array([t[k][4] for k in sel]); rc = np.array([t[k][4] - u[k][4] for k in sel])
    print(lo, len(sel), np.round(np.percentile(r, [10, 25, 50, 75, 90]), 1), np.round(np.percentile(rc, [10, 50, 90]), 1))
