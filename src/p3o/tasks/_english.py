"""A compact English vocabulary for the instruct task's "is this a real answer?" check (6013 words).

Generated, not hand-written: the whole-word tokens of SmolLM2's tokenizer (a word with a leading space
and lower-case letters only), in the tokenizer's merge order (roughly the order of word frequency in its
training text), keeping those whose word or simple stem ("plants" -> "plant", "stopped" -> "stop") is in
the public-domain web2 dictionary (FreeBSD's share/dict/web2), plus a few modern words web2 predates;
words of one or two letters only from a short list ("a", "i", "is", ...), so that word pieces such as
"th" or "re" are left out. The first 6000 such tokens were kept. `p3o.tasks.instruct` also accepts the
simple inflections of these words.
"""
WORDS = frozenset("""
a the in of and to is be for on that con you as pro with an or it are he we by can at from was not this have
us your their they dis all imp will which do more me other man about but per out one if so were also part them
stud up who into these its some tra how self ind when his our may time under col there bet than go cons over
know people like act year such rel been use help new what would need through am work any import ass spec gen
had off most reg no mod develop many add used only first child system get between two ret learn where sur sub
exam inter pers trans pol could health should her well val sim different every high world even form water sign
just make years ref set disc data call hum gra my see then result those way each because effect bel while
process during found art count long pat after gener cent return prog read pub cur lead rep hist fact test life
fam very being fun own she find understand right resp person back students both follow writ important does
grow car min much main che mon before information sol level study great end food start children good might
school within class often around cor made said show pop same too power lit research vis design again small
allow mem mat care poss less example down take organ day support cult quest human treat now individual state
called point number build ser play though prof body did must plan pot him common want met par including ide
three cell pass let elect don social govern char anal creat method known real del conn ess without environment
chang public still change better hand another material report place learning pur interest present project ben
sit list belie product feel cap light development mus become energy open mean few keep others best include
direct vari various name history create top sever leg perform home proper stand move among something mark look
things fin type large think air bas function against law group means rest control dev here provide particular
several significant bus based pain area family potential due object old current mult try program ens beg early
lab cal together focus access last ant non turn lim disease risk fore success making print opt avail possible
low say impact key certain mil period run scient mill land blood case since specific local head post along
value order occur come discuss government text following across why addition cost times areas profess
understanding cause able toward problem systems view major course model else prevent invest intern press hard
line tool relations special available consider species community future comb natural plant complex experience
language role until second country men young works always suggest exist levels problems put mar step today
technology given strong little character results range treatment age ways vol business book next far percent
flow four represent similar education short working essential past space ill sing amount free concept heart
war later author conditions says needs words net give paper kind mind improve resources having skills field
begin parent expect cells rad question tradition knowledge changes appear issues story upon mot concern
require relationship difficult whether log types prim sens ask temper enough likely record usually days
address makes away norm sum questions further protect ever going dig individuals left path account i employ
lay higher growth big century collect full countries super increase connect fund sure science never physical
side brain however plants death term unique especially ground groups above event activities least maintain
throughout contain subject sound near personal modern affect population dam studies really rather effects
reason cancer quality liter nature practice loss associated pattern building stre cases patients detail size
cho hold someone lower general factors million comes explore meet already student global doc word simple
regard nut city living single prob indic members wind themselves materials source towards phot production
respect dom either once seen deg thought deep job according pay house researchers done interact team file cut
required helps created activity analysis fail products aspect engine live fall fig symptoms methods medical
lot market management tot needed action animals political pie idea sent evidence quick flu reduce target
necessary break society soft surface popular color ensure red writing rights sun mass actually parts mess seem
values lives port sometimes yet climate entire share increased rate came approach response friends communities
effective sal provides stress clear below image whole national developed meaning pressure arch healthy
services events context ability taken increasing continue music money avoid related instead adult states
taking considered tell micro culture allows ann review article cannot challenges site five training economic
white reading bal techniques check environmental drug position tools mor behavior traditional except harm
doing assess everyone skin clean itself computer published sense streng react week love critical remain weight
demon condition measure benefits offer content true accept matter black draw bring rev took medic prote
cultural sat cat feed experiences instance regular parents green terms conduct oil implement express identify
previous attention structure stories produce region fish multiple select months sex provided diet face forms
practices total minim unit designed suff company elements industry positive creating consist hours reflect
almost shows half yourself aim psych bar service particularly fat analy soil schools recent claim dog farm
contact involved programs thing temperature sources simply commit link original close sleep deb easy gas extra
enjoy heat chemical ideas max spread travel built aware started led issue historical pict longer performance
greater stop written outside surround models wild lands believe points beaut correct slow movement fire behind
progress threat assert mental leading media books scientists communication code ones user remember fram
standard viol uses custom adapt broad takes altern developing safety stay caused normal daily write numbers
getting growing inside humans six includes importance causes policy basic answer leaders safe complete reve
sustain primary features prep input late looking page webs talk efforts exact tax achieve shap opportunities
thinking shape overall div visit average cross compared damage shown camp earl decision cit strategies beyond
requires force patterns processes rout wid kids network poll series warm bill lack scientific electric quite
town earth probably theory attempt foods quickly international cover request everything carbon cool pack
output inform colon game eat document predict visual tri forest easily ago patient base animal night lif host
families additional valuable sect variety teachers generally search wood civil digital poor gain tree
difference software serious influence ancient crucial lines becomes active reported financial situation
teaching fit added bit companies section included established table applications providing aspects ox tend
images remains sil powerful prior application produced bur speak hands friend security steps concent bad thus
mention transport soon directly religious thous eye quant virus spirit dang video determine establish
appropriate relationships ast belief responsible projects offers got named waste diseases rules places foot
mother hot devices bab diverse military refer agree exercise expected trying install road sus rates objects
final mix asked attack exploring options trees seems card successful legal sea rich typically front limited
components nation journey involves purpose whose highly rob favor jud sold third useful central raise perfect
reach therefore device obtain examples learned minutes goal labor eyes dry costs memory property fair load
went transform demand length severe negative choose month chapter anything respond fast rapid protection
professional speed although param explain pan status via novel solution fight mount significantly symbol
capital supply contribute cam differences regarding version command room lost contains habit adults wide
shared dark bound block beginning principles workers brought ing structures users balance carry stage dim
trust tests actions season private doctor sec forces received literature discovered news mag tim neigh graph
acid limit continued protein hon saw interesting birth date functions solar discover location fear forward
fields laws reasons leaves center message infection organizations items benefit teach testing recommend mole
trade measures weeks teacher bra machine depend therapy root resource construct efficient won smaller prop ten
challenge apply told copy egg shall opportunity initial essay deal receive piece eating authors located serve
assign equipment degree hundred numerous hope existing display names constant details journal moment
properties concepts collection task len solutions rare concerns feature architect effort exactly characters
described expand web nothing sites decisions exposure connection middle burn bott gives dead narr save
affected construction organization identity ice allowing contemporary allowed nearly mid followed planet
recently himself maxim leave goes rule bacteria mig platform older planning weather guide goals beautiful
reduced miss fresh connections technologies scale background infect standards pow fuel sugar fib born
surrounding valid style divers relevant core cold perhaps fascinating hyp alone den summer rock effectively
member basis peace gender applied completely equal stra decided element worth tou coast distance setting
policies promote default wrong coll involve layer academic distinct teeth cop findings north father detect
fully rise educational anti cand fix running note figure currently economy math signs emotional watch son
instruct bodies enter moving profession map mob risks pet giving wanted worked occurs wrote joint miles
insights comfort lived evolution master woman coming alternative cry specifically reality picture passed
factor choice lat capacity king cities south adjust finding trend contract genetic index imagine distribution
rand gold faith topic assist weak citizens changed famous store federal games birds operations illness female
refers resistance actual commonly happens easier regions sexual requirements placed becoming deeper strength
former helping experiment rat presence sample happen price track populations anyone thousands excess
identified feeling formed vital starting drugs winter changing vary showed urban reducing rot sharing diabetes
remove expression fruit defined foreign counter gets topics solid label random attract direction advanced
eventually tasks mal letter mouth connected tox feelings situations ball plans vill advance board filled
mentioned hair immune stim readers ready resulting pen awareness consumption partners lessons hop glass
despite bond causing sort pieces train conclusion separate sac blue tele bed playing thoughts chance dial
eight technique garden interpret believed approaches experienced pick vision increases gave staff row expert
depending sustainable manage medicine error baby encourage cultures belong mission presented outcomes billion
native professor observed church contrast frequently appears relatively income classes walk businesses engage
column wonder majority emissions plays suggests truth buy discussion helped languages files onto records
advent heavy felt reference tissue sounds creation processing office transfer internal plastic height
characteristics option format river improved reports increasingly prefer turned disorder immediately alcohol
notes ensuring disorders mist engineering muscle clinical represents classroom male industrial gene race
conflict institutions colors generation iron diversity anxiety interests enhance dive participants release
college homes commercial trig metal maintaining approximately win introduced party leads violence religion
challenging consequences vast meeting decades breast storage clearly temperatures justice freedom tour film
court huge nutrition speech focused insect units practical milk buildings independent career engaging strategy
emotions assessment seek batter statement replace keeping creative cycle minor studying treated settings
extremely experts continues interested correspond primarily cook conducted depression electricity survey
bottom star hear campaign wis organic pul flex notice widely efficiency carried dram prepared spot generations
sand grant bud secret bone highest spring wall combination drive pros string household extract favorite moved
artists movements invent perspective performed familiar thick played recommended conservation chronic
operation spiritual song spent fundamental gather seven library meant signal responsibility choices saying
beliefs environments fine volume oxygen vulner adding professionals consult covered failure kid properly mel
poly external university remind pal landscape significance served happened arm degrees impacts articles item
centuries seeds title lesson advice cast examine dogs seed plot generate carefully papers samples upper origin
ocean highlight smart mere letters round closely component screen array mer containing finally roll figures
send wealth previously potentially ecosystem amounts networks looks released err referred describe injury
flood purposes vegetables owners destroy confirm aid nuclear linked jobs seeking pages accurate advantage
president ourselves god tum leaving radio straight traditions convent meat dangerous removed surgery capable
battle estimated formation ongoing credit promoting comment roots roles explained tail maybe mostly radiation
reb enable possess pollution sou sets relative otherwise apart grade subjects push recognize square guidelines
victim phase revolution eggs rain determined tal secure argument faced atmosphere motor vitamin pun voice
combined nor definition treatments farmers genes infections sports technical intelligence monitoring grand
appreciate earn supported reaction facts taught frequency annual manufacture worry involving periods official
looked faster noted whom collaboration offered knew spend cognitive talking authority hour ultimately nations
helpful renew slightly answers please charge hearing align showing completed grass killed scholars lung hit
ideal tiny existence reached stream cere substant description vent excellent cris truly perspectives improving
salt reduction smooth maximum tooth island proposed die traffic knows yield exposed obvious brief kept phone
bank candid electrical layers particles interview chemicals kinds solve acknow amazing deliver exchange raised
parties intended operating sufficient muscles remained goods flowers offering certainly drawing coal firm ban
indicate motion computers extreme regional selected themes governments raw views affects depends liquid sett
hyper follows double flat closer youth resist fruits ship regularly funding nutrients happy appoint creates
edge returned spaces fort texts handle thin tips discovery mort suggested bird rein asking kill hospital
mainly hidden informed begins innovative dedicated medium investment procedure rapidly abuse careful proteins
tried waters forced documents doll storm diagnosis southern toxic bright supporting moist circumstances client
fluid occurred stone behaviors leadership procedures prepare window leader stars foundation consistent manner
millions suitable intellect sector brother selection poet lies mode yellow employees pictures station
infrastructure loved morning pretty era domestic biological ingredients underlying skill decide vehicle join
match interactions bow northern formal settle drop instrument prices collected pray wear walls guidance
instruction delve wet harmful persist appearance recorded virtual oral click snow poverty variable sudden
extent remark links driving fostering facilities courses moral drinking west wait discussed feedback emergency
depth sensitive strengthen serves detailed entirely communicate filter minimum cutting listen fill define
struggle sides institution introduction recovery lots chain examining messages touch sen agricultural shel
girls starts claims hero speaking controlled comprehensive innovation typical attacks responses shaping
regulations largely stages audience addressing matters vaccine lose rural sell park grown recognized consists
chosen exists drink liver mechanisms sequence band ahead restrict habitat torch accepted intervention wants
cars trial politics node agriculture police fro aimed assistance latest prompt cooking ment interaction crops
opening opinion absorb successfully sin studied variables fiction stret narratives harv knowing nit stem
script budget crisis wave hundreds catch server divided indigenous reform adopt couple transition relax entry
afford discussions protected residents measured survival doctors session apparent accounts naturally calls
acts neighbor vehicles critic principle positions parameters suffering machines beauty gar alt universe
implications stock representation hunt brand medications walking exploration therm attend reject resilience
shapes waves department tun nearby ethical coff conscious trends creativity maintenance generated boundaries
visible understood san stronger shift wire concerned curriculum broader prevention frame wildlife tells
concentration confidence portion massive inner framework boost producing sick remaining mobile wife kil habits
rig officials implementation gained substance abilities army obtained engagement managed managing sweet
signals cloud greatest east desired appeared programming narrow switch noise witness seeing architecture
expensive improvement conventional explains demonstrate floor reader designs nan decrease recognition
pregnancy experiments fold taste stored impossible electronic marked imper pure tested sentence locations
soldiers gun pig inflammation failed injuries customers persons manufacturing slowly brown rail philosophy
considering unless foster transportation toler closed facing sky western exercises capture instructions
everyday participate horse indeed players enables ages pand revealed kit platforms prison exciting agreement
artificial stick cos mac crop remote shop derived dental inches secondary stands competition tit fixed agreed
pair monitor incorporating float composition rub consumers mixed photos extended heritage chart psychological
standing possibly usage syndrome arrange forests plate turns ensures dynamics depict pip inspired museum
director incredible sole repeated deaths passion evaluation analyze shell protocol mathematics beneficial
writer pull examination bones bot intellectual literary agencies arms stated achieved unknown organized
medication expectations resolution village marine accuracy thread employed supports whereas opened errors
writers meaningful confident score adopted limits categories dust deeply powers arts describes functional
arguments childhood ethnic represented evaluate arrived demonstrated tur forget emerging reactions scene
comments brings conversation distributed appreciation realized dynamic fell administration door houses holds
listed suffer rely wisdom extensive cart worse collective grew pump decline supplement industries diss flight
fewer leaf insurance transmission infected blocks intake healing zero presentation ratio camera fertil
possibility technological alongside chief immediate marriage coffee creatures matrix normally mountain
discrimination seemed empathy steel survive fighting molecules twice density gall comfortable markets returns
desire indicates navigate learners tall missing moon applying colleagues authorities latter broken alle wish
din expressed breathing insight compare younger societies advantages willing guess societal publication prove
styles observations inject necessarily publish strict gal painting update optimal commitment fant listening
continuous housing supplies crime debate axis focuses agency shut vulnerable myth category succeed
participation aer organisms greatly domain adventure instruments originally fabric thereby fly electron ear
sections circuit eld dealing engaged verb turning difficulty emerged breath physics photograph ends artist
threats thanks fellow bread mechanism meal holding accessible orient independence sight consideration district
whatever battery grid teams employment objective magnetic complicated serving aircraft empt funds warming
reliable waiting stability cards opposite bear drain accident trained routine trip uncertain insects doubt
maps sod delivery tap unexpected occasion chick sought flag laun meals affecting editor logging consumer
preparation noticed module attached false spending characterized reduces concerning split stake acids
substances player demands initially encounter theories curiosity stable beings heavily alter fossil comparison
border vessels cup corn teen butter sales widespread produces summary calcium purchase mathematical partner
drawn regardless stomach forth complexity compounds remarkable profound fiber humanity unable dance none
inherent tea racial putting permanent contributions launch rid mood adequate clothing perm troops preventing
smoking convey proceed influenced expansion delay legs surfaces criteria happening replaced swim operate
joined trouble subsequent committed lens limitations initiatives mand decade angle concrete insert substantial
subs gone asp channel street focusing craft dent refuge centers conference protecting disturb conflicts
facilitate territory percentage runs tut laboratory fashion realize mild labels zone reward introduce aims
minds detection rice roof seconds preserve symbols resulted intent reveal trials flour veter gap installed
theme investigation proof jump sheet constitution stuff neck daughter neighborhood alike bridge disrupt
recommendations identifying route prominent biggest receiving shot encourages feels graduate depart enabling
passage warn gram curious emotion relation contained argue gradually excessive corner thesis constantly
barriers dream hydrogen engineers nine crow liv entertain integrated merely providers moves dialogue hole
equivalent estimate founded greenhouse feeding presents interpretation biology vote advert printing
implemented statistics musical twenty amid evolved calculate seg agents honor differently correctly educators
recept artistic possibilities moisture abstract nerve robust colonial grad rising treating married shad
supposed thousand whenever intricate plenty ended division myself interventions measurements conversations
equally measurement unusual instances difficulties targets legislation relief capabilities dioxide combat
requiring branch bringing pool phenomenon estimates owner outcome debt ped parallel rivers objectives
mechanical effectiveness assume nob controls tissues destroyed discussing integration specified overcome paint
obesity diagnosed ran cats passing algorithms minimize performing minerals biod clients joy repair fairly pup
notable movie boy historic award solving contributing batch explanation explicit finished frequent farming
covers convert handling universities rocks developments danger customer parser myst algorithm lights
experiencing cholesterol strongly ships structural exception simultaneously tag scan universal organs forming
scores videos specialized shed neither newly embed fest victims visitors sizes spin sport bath nervous
cleaning realm association stores damaged eastern respectively encouraged trauma representing electro tank
sessions voltage circle influences contributed adds icon sharp observe smoke computing statements launched
resident reaching peoples bigger mining myster button molecular tack equality poetry attempts intense banks
blind mice coastal transformation gent weapons mir flo psychology observation somewhat container empower
qualities branches criminal regulation friendly inn watching shaped formula empty incorporate issued bonds
archae fever linear faces carrying moments defense digest stroke agent productivity entered rect sitting
assigned photo boys essentially rank variations poison constructed permission captured marks corresponding
chances schedule descript blow encouraging abandon destruction caught stead updated viruses compassion judge
mask literacy plus peak printed ranging volcan width escape actively robot personality pit enemy strategic
versions surprising glucose modified efficiently burning sunlight arise inspect rab sla implementing
ecosystems renewable promise meters hun await practicing narrative dates emphasis tables approved posit
females marketing preferences nose explored composed classic tub planned sad girl desert weakness kidney
disaster automatically announced mixture scientist mortality assets babies ordinary expressions improvements
purs keeps precise dimensions slavery render poem indicated analyzing proven considerable tube males falls
paras ring attach brush inspiration signed guard channels insulin profile availability panel strain proportion
laid traits wonderful pin memories cash proved tons declared measuring uniform finds origins disabilities wine
extend targeted varieties counsel heating senior dependent perception plane satellite sensitivity preparing
enhancing preserving norms attitudes identification tact club scenario exhibit mold defend interface usual
tension election provider safely equation county chest privacy removal quiet contribution scope dollars
inhabit husband peer choosing roads hem inspire respiratory sensors vocabulary celebrate wound connecting
outer tract intensity extraordinary experimental facility audio marginal faculty windows ecological ritual
protective finger driven imaging turb warning horses gut feat decreased lie maintained prospect coverage
minute opinions stere vector essays absolute galax theoretical spectrum alive honest driver interactive
calculated honey soph giant strange dietary advances anywhere pounds defect breeding translation processed
varying officers silver abnormal evil paragraph van recover reporting holes query rarely flower complications
losses migration tick principal eliminate reverse covering scenarios haven reasonable bias profit sentences
copper cream television roughly recall taxes absence seemingly package compound perceived dominant claimed
committee fault commission hardware flavor physically embracing trace islands accurately orbit consume
collections functioning pregnant mutual coding reflection suscept radical cab balanced crew variation tip
minimal dish fourth logic embark flows confirmed edition lists arrest harder lock heads requests consciousness
designing wheel investigate tow breaking flexibility nodes grain soul cham references examined quantum batt
wondered vertical vibrant flexible duration opposed rational lake herself lighting parameter brow authentic
phrase chlor mountains contributes granted libraries fishing screening bag surprise superior acquired manifest
rose spark hazard calling probability calories researcher achieving curve detected delivered worship pond bene
mineral grows loop sensor classical fra landscapes exceed peers dose saved sculpt temple extension competitive
phenomena motivation songs globe appeal democracy infant unders visited ease diameter dishes isolated clothes
cooling determining towns copyright beneath password expanded determination pandemic advancements alternatives
surge stations enhanced neural suffered compos temporary gast chemistry contexts versus manager habitats
raising disability breed losing grains stakeholders blank ordered elsewhere keys elder gathered wheat unity
visiting les submit luck happiness drag hence addressed hormone excited tribes suddenly controlling exhaust
telling aged columns acute edges directions tropical countless saving voices acting mine hunting seat terror
buff bomb manual viewed union decay stopped occurring chose fed integrity stones candidate combine preferred
thermal nitrogen legacy gently cluster achievement streets magic farms shoot falling removing tales tight
equipped spatial amidst grades bacterial attributes involvement highlights quantity genu definitely asthma
evening illegal paying duty wearing vitamins suit directed elected calm discipline pointed separated nutrient
magical plain auto differ writes trigger divine mistakes breaks ownership span manufacturers orders philosoph
physician laser dictionary solely shock courts responsibilities segment flying planting concentrations fatty
logger paths sacred fats gentle lip secre gases doors argued inclusive alert toys neutral perfectly drought
addiction pairs dramatic clock chair metals finish cattle royal incident obstacles panels analyses slaves chap
fought tough characteristic recognizing spoken cardiovascular tone nice ton enorm planets entering mock worst
slave imagination manuscript practitioners spots candidates behavioral establishing graphic moderate priority
expanding notion hurt staying audiences atoms contents concluded charged combining adapted avoiding identities
stood export intention oldest transmit predicted wat settlement popularity params drivers customs tong evident
lungs communications gravity bees wise gest lecture welfare patience wider accomplish initiative flash restaur
regarded gif owned engines cotton grab quarter lasting steam reflects meditation regulatory struggles
promising films restrictions selling delicious continuing strike tumor hospitals reveals photographs
establishment meetings consistently illustrate mouse buying aging crypt antibiotics attitude fur reviews
devast adverse tom shares tobacco juris illnesses polar sciences consumed athletes mothers novels judgment
distances celebrated batteries believes hall executive therapeutic threatened unlikely tracking vaccines weigh
acceptance adaptation conversion cord wars transformed fuels directory prime assignment existed supplements
cond scenes confusion everywhere lifetime discoveries pose membrane inputs entities fatigue acres thrive
influential journals consent statistical payment threshold critically promotes codes applicable chicken
storytelling sending essence logical assembly token compliance participating demonstrates precision
accompanied addresses comprehension converted medieval unlike forecast dating cycles courage households buried
joints deficiency armed legend chocolate cure register collecting harmony compost restore dairy configuration
settled requirement powder hypothesis debates juice vegetation pressing publications beat drinks opposition
inequality explaining isolation reaches sophisticated gods relate bless positively lymph killing boat hormones
displayed ethics reputation corporate prayer excite estate workplace precious enjoyed license withdraw varied
spoke equations spray classification utilize considerations suggesting officer aside pill savings gardens
autism worker yes reflected complement forever thorough portray quantities clay classified deploy assumed
zones accordingly spreading paintings interior posts anger fitness outdoor currency suggestions assumptions
applies governing recycling immigrants ancestors strengths violent texture orientation emerge herb cub
economics accounting ham likelihood colonies borrow shorter prosper kitchen pets ignore lowest crown partial
inhabitants overview tailored neurons nutritional genome distant enforcement fires holiday seriously grounds
mature aggressive revenue appointed pace legit cow repeat featuring subtle bare employee hat personnel victory
beans utility brains thank indirect prey harvest basically striking scheme urine developers cancers finance
surrounded loyal ears sequences recording copies selecting integral homework movies viral stack precisely
struggling captivating null borders medicines circulation designated painful bin replacement draft kingdom
rows newspaper tor managers evolving summar disagree definitions dreams acceptable coat criticism identical
teachings impair wooden ion worlds lob enormous vegetable penal somewhere importantly relevance reasoning
tends ultimate predictions sectors separation describing surgical gaps fan restoration associate tab nuts
basics thoroughly backgrounds scales cha gate tang caps collaborative nest gathering begun sale navigating
shifts ranges varies constraints distinguish sodium fingers independently evolutionary virtually tale
fantastic preservation layout suspect modeling hal scar busy productive streams reproductive assessments
fraction commands sister dies orange seam districts minority twist funded reserved trading genre prevalence
barrier dress gift permit infants designers embrace mystery template execution grace democratic conclusions
factory transmitted wash grasp proposal inclusion partnership temp occasionally traveling representative
investments reflecting buck divide compelling oils encountered cheap burden fisher comparing readily filters
harsh rooms amongst tape parks vessel containers dropped crimes governance weights adoption chromos pushing
shore registered dense belonging tolerance impressive entity regulate acknowledge analyzed sees province
heaven destination cheese digestive pix harness excitement hybrid innovations uncertainty diagnostic mapping
soils cough annually rent optical visits accord passes sensory serial sampling outbreak placing indicating
freely severity provision offset persistent cater prolong pursue particle labour resistant routes transactions
gum invention centered advisor submitted bool diets crack eager generating smell speakers pod integrating
absolutely revers occupied grammar respective regime reign electrons bub hydro opens colorful resolve
disciplines bat shoes cited spinal menu underground disk morph bears prescribed purchased distract expenses
transplant merch delicate searching churches develops photography phones skilled attending civilization
displays livestock ash planted territories neighbors dimension apparently cig boundary loud observing
volunteers pilot delight investors tongue literally welcome cuts linguistic hygiene bite duties lean colony
magnitude installation overwhelming religions horizontal swimming clouds plug attractive pupils gear shelter
debris tort deals inch distinctive embedded systematic bags tech beach synthetic documented juvenile sheets
preserved accidents incorporated cellular conducting metabolism deer retain prevents developmental equity
broke bottle fet teaches invasive throat highlighting engineer thyroid puts guarantee consuming rotation
mammals hazards lakes rib ending operational satisfaction reef enrich rough documentation recipes altered
specialist speaker ruled elderly susceptible attribute incidence suicide tackle discomfort interconnected
wings soy residential struck bullying plates dramatically citizen campaigns punishment attributed speeds
acquire utilized velocity absorption transferred totally wing surroundings symptom historians inspiring bought
arrival throw returning sleeping continent ok golden restricted desk loose villages sediment outline surveys
knee intersection consequence dried till translated diving simulation mobility locally elections bleeding
therapies geographical oceans elevated enabled colored workshops toy affairs herbs abundant immigration
affordable setup refused endangered loan counts genuine rays improves producers gray overs progressive empire
updates ride irrigation bits nursing hack tourism cable carries pathways intriguing administrative descend
consisting racism arthritis actors interviews flavors abundance hopes explicitly achievements defining mistake
contamination binary distinction teens incredibly infectious robots sheep emphasize winds cultivate binding
drives attempted retail unnecessary hob erosion python filling dementia trick checks stew adolescents circles
invasion typing seasonal stems philosophical pipe entertainment jew checking hide allergies settlers
evaluating diver assistant semi approval browser advocate amino alpha functionality imagery liberal realistic
enzymes facial complexities undergo protocols emit comprehend seeks calculations activation beam holy rainfall
trail demonstrating charges rigorous rejected heal lunch organize cloth nam tumors diagram abandoned imperial
mas attended arranged missions receives elementary vine arrive patent architectural explores cameras shoulder
frameworks stretch arter twelve shopping landing pride patch circular careers confused bind strains metabolic
secrets discharge intelligent rhythm afternoon hung beta kindness camps hearts progression anat adjacent
entitled straw featured combinations atmospheric wake gains bust indicators molecule inflation swelling
representatives controversial collapse introducing tendency sons invented fifth correlation calendar
celebration digit harmon economies raises cooked friendship instant earned asks completion fate bee bold
competing weekly fibers injured publishing mes meanings optional personally spine guides encompass adventures
combines relating campus consistency agreements evaluated pale cope dinner angles kernel lemon germ reviewed
nod header presenting poems uncover hip histories noun broadcast convenient immense continuously operated
assignments firms partly posted mirror institutional earthquake globally deposits geometry officially distress
contaminated systemic mutations thirty recipe offices invited employers bull representations absorbed
departments markers magazine guided shade predators sacrifice steady refugees supportive attempting
transparency rend strive painted tower iter qualified pesticides investing seal writings vag descriptions
footprint survived exhibition thickness doses chamber meets pest gaining slight mindfulness humidity static
pests wondering sorts monthly salmon organism timing phrases mart font associations relatives electronics folk
partially manufacturer lift pleasure answered heter worn chat endless talks blo accompany doctrine impression
defines synthesis dentist advertising entrance titles battles organizing modify accessibility folks
arrangements atom prevalent yields burned discourse sustained highlighted washing enzyme appointment wage ber
incorrect implies surveillance interval extends tied minister diamond brothers pressures warrant utilizing
printer limiting subsequently fears afraid basket accomplished executed acquisition cave mail rooted offs
grants traditionally drops asset pitch partnerships surprised physicians influenza tribe modes payments dying
contracts tracks pine enjoying assault crafts similarities gau grat completing bills dangers provisions evolve
peaceful sail admin quad council revolutionary arrangement constitutional volumes mysterious chains soap
picked expressing occupation apple disasters enemies compensation pink exit namely allergic workshop prone
indoor ingredient atomic professors prescription minimizing vice operator dedication phon tanks fulfill
singing replied ric packaging alien obviously exceptional yoga illustrated constitutes approached beloved
onset seasons fertility coins wages potassium perceptions tags imposed boards awarded kilometers bike caring
plasma originated butt editing murder dismiss worried mim appet crust shallow furniture cod potatoes integrate
classrooms mixing insist immunity degradation numerical vaccination joining stereotypes clusters heated
extraction sour concert spelling wireless fluor interpretations reproduction verse canal politicians visually
treaty contrary alignment prisoners recommendation marker erect decreases frozen verify frequencies fluids
torn reservoir defects warfare stuck purchasing quote extinction portions abroad bridges eaten toxins pushed
musicians genetics irregular fees fatal railroad emphasizing loans monument nineteenth smoothly creature exams
argues compute reliability avoided emergence antibodies mile lin strand grams dual stunning trusted chapters
tens gifts consensus assessed poorly bands algebra artifacts prolonged educated profits malaria humor nerves
baking valley senses ties algae stops accountability tactics tar enduring decent blend mira strings
counterparts viewing beet attain revealing attacked specimens tired odd modules expense transparent nurses
labeled followers cups negatively motivated carbohydrates vacuum efficacy marginalized disappear exert weapon
flooding formats champ beef casual bearing passive meta machinery prediction phases heroes concentrated voting
discovering biblical admitted delivering pursuing edit guns ignored verbal dialect valve fertilizer horn
enumerate clues fans organizational drawings tubes shipping structured relaxation bowl magnet fails constitute
travels segments thinks coral operators feather supervisor rubber equitable physiological fallen devastating
expedition reserves relies colleges lambda alphabet disparities devoted angry corporations necessity traveled
prevented festival uncomfort navigation episode challenged founder rewards pap shifting leak aster stiff hills
foundations ought caution practiced stressed profiles triggers compact referring watched valued fits confront
counting meter matches viable similarly hazardous responded ruling symbolic enhances needle retire drainage
emphasizes mitigate emission capability beer pediatric spirits corruption incidents slide belongs verbose
predominant liberty orb historically winning interrupt expend tensions genus breathe defeat floating dow
shield maximize locate puzzle entrepreneurs stimulate rituals permitted affirm dominated damaging educate
gardening fosters intervals reinforce automated holistic exclusively hardly entries palm magnesium mechanics
checked relates attracted lawn determines tutorial bulk exploitation united aids rod metrics diagnose dollar
administered recur culinary critics talked metric flowing stir influencing jaw yeast succeeded volunteer brave
cookies repeatedly ger rocket pars injection uncomfortable deadly storms parse weaken addict historian
graphics inflammatory dens tear creations insufficient terminal nick lying treats packages servers epidemic
wealthy generator circuits preference garlic supplied specialists ink meteor sunny reads upset distinguished
diarrhea intensive automatic investigations folder occurrence disposal macro accommodate unprecedented gland
disabled builds domains hind illustrations newspapers publicly bugs aquatic geography considerably assumption
autonomy survivors brilliant terrain delves encoding fraud marvel romantic alarm nurse vivid protects
signature hunger situated frames hosts receptors bases vert readings chip contradict undergraduate tries
coping refine transaction vulnerability targeting loaded geographic zinc masses plots swallow aluminum
headaches advocates exclusive biases recycled hill matching vocal wed modifications unemployment conclude bell
briefly regression loads galaxies tensor adopting investigated crossing fut bark empirical pathogens thumb
admit screens prosperity suspected satellites validation beds tire pathway allergy unwanted lets promised
behave powered clarity reminder shadow sorted football disappoint cel bes performances cues rats indicator
depicted methodology conservative disputes replacing walked flags someday compromise chips arc lux enact
comparable outdoors darkness missed delete kin socially parliament trips optimize encounters census promotion
galaxy mysteries crystal imported combust bars twentieth pulled accused precipitation specify priorities coin
informal priest fee wonders inherited pipeline sperm hoping steep lith advocacy protest pollutants calculation
generates retention restored recommends terrible adjustments collaborate explanations iconic fusion instructor
releases mercury smallest whales crowd methane enters enterprise advancing olive standardized yard kings
declined behalf traject accordance citation remembered failures vomiting cite compete attachment fungi pursuit
pointing reserve accessed rear activists placement membership epoch traged manipulation rings strengthening
poses dot trains consol severely niche inherit analytical assessing belt factories cheaper computational
packed therapist extending mud perceive antibiotic compression mush dirt keyboard translate lesser bladder
upload interpreted scattered suited participated aesthetic farmer conferences rival counties drama execute
talent sphere alb inventory neglect adaptive tribal lever promises fundament contra speaks digestion smile
makers genetically whilst bench rolling costly guiding rum employer overweight announce comic bottles appetite
altogether wires castle licensed outputs tunnel nuanced textbook pipes interference lighter absent initiated
quantitative networking negotiations simulations underwater investigating separately bay gaming deciding strip
cardiac glasses substitute rescue insulation desires radius operates desirable odds strictly conceptual
registration demanding appropriately requested relying rises convict echo lenses warmer fragments optimization
telephone ceremony transcript neighboring cro reforms temporal convention freed surely anxious obtaining
schemes laugh coupled hate capturing forb outlined closing archaeological tomorrow slope connects boats
mounted arrays telescope pad forgotten respected individually celebrating promoted timber astronaut drew
communicating firmly obligations tempt zip governor posture volcanic induced exceptions presentations chaos
shortly jewel weaknesses scheduled enthusiasm preschool editors impacted recovered cache races concentrate
breakfast protagon routines extracted apples lectures bom timely momentum pivotal fifty prest pepper median
silent mutation tomatoes thrilling stays magnific larvae witnessed ions passengers grey neurological
migrations premature sugars inquiry buffer possession emotionally whites eligible hint accumulation manipulate
manufactured riding morality brut posed planes omega cuisine blacks traced oneself responding chop polymer
charts gums thy vapor elaborate aligned alleged dispute melting legitimate bowel genres environmentally unfair
advised intermediate slower pollen pulse skull occasions bod socioeconomic acknowledging physic epic
pharmaceutical denied controversy bon cavity bustling breakthrough convinced substantially blame conjunction
cum jurisdiction offspring march secular forcing relieve civilizations tremendous titled satisfied wax arises
residence thrown deemed divisions passionate renowned appealing legally dear unclear sauce fertile brick radar
citizenship sends wool judges legislative gay anyway hub projected unfamiliar handy dignity solved flesh
receptor prostate abdominal invisible emphasized consisted surviving revision impaired plaque letting
classmates enjoyable okay email online website internet app apps smartphone laptop wifi download selfie
texting
""".split())
