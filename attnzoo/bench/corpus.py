"""The English text that the `minilm` input kind feeds to the model (written for attnzoo, public domain).

Plain prose on several topics, so that the captured attention maps show what a real encoder does with
real text: heads that look at neighbouring tokens, at punctuation and separators, at repeated words,
and heads that spread out. About 1,050 word pieces; longer inputs wrap around.
"""

TEXT = """\
The river that runs past the old mill is wider in spring than at any other time of the year. When the
snow on the hills melts, the water rises over the stones near the bank, and the children who cross
the wooden bridge on their way to school stop to watch branches and leaves float past. The miller,
who has lived beside the river for forty years, says that he can tell the month from the colour of
the water alone: brown in March, green in June, grey and slow in the long weeks of autumn.

A library is a quiet machine for remembering. Each book on its shelves was written by someone who
wanted to keep a thought from being lost, and each reader who opens one takes part in a conversation
that may have begun centuries earlier. The catalogue tells you where a book stands, but not what it
will mean to you; that depends on the questions you bring with you, and on the other books you have
read before. Librarians like to say that the most useful book is often the one next to the one you
were looking for.

Bread is made from four simple things: flour, water, salt and yeast. Mix them, let the dough rest,
fold it, let it rest again, and then bake it in a hot oven until the crust is dark and the loaf
sounds hollow when you knock on its base. The difference between an ordinary loaf and a remarkable
one lies almost entirely in time. A dough that rises slowly overnight in a cool kitchen develops a
deeper flavour than one hurried through in an afternoon, because the yeast and the bacteria have more
time to work on the starch.

In the early days of railways, every town kept its own time, set by the position of the sun at noon.
A traveller going west would find the clocks at each station a few minutes behind those at the last.
This caused confusion in timetables and, now and then, accidents on single tracks, so the railway
companies agreed on a standard time for the whole network. Within a few decades the idea spread to
entire countries, and later the world was divided into time zones, each an hour apart, that we still
use today.

Mathematics is sometimes described as the study of patterns. A child who notices that every second
number is even, or that the sum of two odd numbers is always even, has already begun to think like a
mathematician. Proofs are the way mathematicians make sure that a pattern holds in every case, not
just the ones they happened to check. A single counterexample can bring down a conjecture that has
stood for a hundred years, which is why a proof, once found, is treated as something close to
permanent.

The weather on the coast changes quickly. In the morning the sea may be flat and bright, and by the
afternoon a wind from the west can raise waves high enough to keep the fishing boats in the harbour.
Fishermen watch the sky, the birds and the barometer, and they listen to the forecast on the radio,
but many of them still trust the feeling in their knees more than any instrument. Old sailors claim
that a red sky at night promises a fine day, and there is some truth in the saying, since in these
latitudes the weather usually comes from the west.

Learning a language as an adult is slow, but it is never too late. The first words are the hardest,
because nothing connects them to anything you already know. After a few hundred words, new ones begin
to attach themselves to old ones, sentences start to make sense before you have translated every
part, and one day you notice that you have understood a joke. Teachers say that the secret is to
listen a great deal, to speak without fear of mistakes, and to read things that you would enjoy
reading in your own language.

A good map leaves things out. If it showed every tree, every stone and every path, it would be as
large and as confusing as the country itself. The mapmaker chooses what matters for the reader: roads
for the driver, contour lines for the walker, depths and lighthouses for the sailor. In this sense
every map is an argument about what is important, and two maps of the same valley can look entirely
different while both being correct.

Computers store numbers in a fixed number of bits, so most real numbers can only be approximated.
When a program adds a very small number to a very large one, the small one may vanish entirely, and
when it subtracts two numbers that are almost equal, most of the significant digits cancel and only
rounding noise remains. Careful numerical code orders its operations to avoid these traps, keeps
running sums in higher precision, and checks its results against a slower calculation that is known
to be exact.

Gardens reward patience. A tree planted today may not give fruit for five years, and a hedge takes a
decade to grow thick enough to stop the wind. Gardeners learn to think in seasons rather than days:
they plant bulbs in autumn for flowers in spring, cut back roses in winter so that they bloom in
summer, and leave seed heads standing through the cold months for the birds. Those who stay in one
place long enough come to know which corner of the garden freezes first and where the snow melts
last.
"""
