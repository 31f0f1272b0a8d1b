import sys
from pathlib import Path
import numpy as np, cv2
sys.argv = ['x']
import detection as D
from ferkit.faces import YuNetDetector
det = YuNetDetector()
scenes = D.scene_photos(Path('/work/shared/data/fer2013'), 600)
def rolls(lm, box):
    p = np.array(lm)
    (rx, ry), (lx, ly) = p[0], p[1]
    eyes = np.degrees(np.arctan2(ly - ry, lx - rx))
    em = (p[0] + p[1]) / 2; mm = (p[3] + p[4]) / 2
    v = mm - em
    axis = np.degrees(np.arctan2(-v[0], v[1]))
    mouth = np.degrees(np.arctan2(p[4][1] - p[3][1], p[4][0] - p[3][0]))
    return eyes, axis, mouth
rows = []
for sc in scenes:
    tis = det.detect(sc['tilted'])
    m, _ = D.matched([d.box for d in tis], sc['centres']['tilted'], sc['sides'])
    for i, j in enumerate(m):
        if j >= 0:
            rows.append((sc['angle'], *rolls(tis[j].landmarks, tis[j].box), tis[j].score))
r = np.array(rows)
for name, col in (('eyes', 1), ('axis', 2), ('mouth', 3)):
    est = -r[:, col]
    print(name, 'slope', np.polyfit(r[:, 0], est, 1)[0].round(2), 'corr', np.corrcoef(r[:, 0], est)[0, 1].round(2), 'abs err p50/p90', np.percentile(np.abs(est - r[:, 0]), [50, 90]).round(1))
